"""A headless Chromium for the tests that render pages, found or installed on first use.

The monitor notebook is rendered the way a reader sees it: exported to HTML and screenshotted by a
real browser. No Python package ships a browser, so on a machine without one (a fresh Debian, where
the README's test command must pass by itself) the first test that needs it installs Debian's
``chromium`` package with apt-get — once per machine, under a lock so concurrent sessions do not
race. Anything else (not root, no apt-get, the install failing) fails the test with the command to
run, never skips it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess

import pytest

NAMES = ("chromium", "chromium-browser", "google-chrome")
INSTALL = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]
LOCK = "/tmp/distpen-tests-chromium.lock"
#: the flags of a headless, offline run (the machine has no network beyond package registries)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


def find() -> str | None:
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(cmd, env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


def install() -> str:
    """Install Debian's chromium (as root, with apt-get) and return its path."""
    how = "apt-get update && apt-get install -y --no-install-recommends chromium"
    if shutil.which("apt-get") is None:
        pytest.fail(f"headless Chromium is required to render the monitor and this machine has no apt-get: "
                    f"install Chromium (Debian: {how})")
    if os.geteuid() != 0:
        pytest.fail(f"headless Chromium is required to render the monitor; as root the tests install it "
                    f"themselves, otherwise run: sudo sh -c '{how}'")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test session may be installing it right now
        path = find()
        if path:
            return path
        res = _run(INSTALL, env)
        if res.returncode != 0:  # the package lists may be missing or stale on a fresh machine
            upd = _run(["apt-get", "update", "-qq"], env)
            res = _run(INSTALL, env) if upd.returncode == 0 else upd
        path = find()
        if res.returncode != 0 or path is None:
            pytest.fail(f"could not install Chromium with `{how}` (exit {res.returncode}): {res.stderr[-1500:]}")
        return path


def chromium() -> str:
    """Path of a Chromium executable, installing Debian's package first when there is none."""
    return find() or install()
