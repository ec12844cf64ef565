"""``python -m distpen.cli``: the ``distpen`` command."""

import sys

from . import main

sys.exit(main())
