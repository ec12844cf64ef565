"""The layers stay honest: imports point down only, and no two modules import each other.

Every module of ``distpen`` is parsed with :mod:`ast` (imports inside functions count too) and each
import is resolved to the module it names. Layers, from the floor up::

    floor        errors, store, cluster, security and the private helpers
    core         weights, layout, pairs
    penalties    the math, in memory
    sources      where gates come from
    coactivation, curvature   the distributed jobs (siblings: neither imports the other)
    dashboard    status, monitor, plots
    cli          the ``distpen`` command
    distpen      the package itself, which re-exports the public API

A module may import from its own layer and from layers below it. A module the map does not place is
an error too, so a new module has to be given its layer. The checker runs on planted trees as well,
to show that it finds an upward import, a sibling import and a cycle.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

ROOT = Path(__file__).resolve().parents[1]

#: (rank, layer) of each top-level name in ``distpen``; siblings share a rank
LAYERS = {
    "errors": (0, "floor"), "_validation": (0, "floor"), "_fastcheck": (0, "floor"), "_alloc": (0, "floor"),
    "_workers": (0, "floor"), "_parallel": (0, "floor"), "_broadcast": (0, "floor"), "store": (0, "floor"), "_chunkio": (0, "floor"),
    "cluster": (0, "floor"), "security": (0, "floor"), "_intrinsics": (0, "floor"),
    "weights": (1, "core"), "layout": (1, "core"), "pairs": (1, "core"),
    "penalties": (2, "penalties"),
    "sources": (3, "sources"),
    "coactivation": (4, "coactivation"), "curvature": (4, "curvature"),
    "dashboard": (5, "dashboard"),
    "cli": (6, "cli"),
}
TOP = (99, "package")  # the package's own __init__: re-exports everything, imported by nothing


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted name → file of every module of ``package`` under ``root``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that module ``name`` imports, anywhere in its body."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                found.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - (node.level - 1)]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:  # `from pkg import sub` names the submodule itself
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
    out = set()
    for m in found:
        while m and m not in known:  # `import pkg.sub.attr` style: the longest known prefix
            m = m.rpartition(".")[0]
        if m and m != name:
            out.add(m)
    return out


def layer_of(name: str, package: str, layers: dict) -> tuple[int, str] | None:
    parts = name.split(".")
    if parts == [package]:
        return TOP
    return layers.get(parts[1])


def check(root: Path, package: str, layers: dict) -> list[str]:
    """Every violation of the layering rules and every import cycle, as readable lines."""
    mods = modules(root, package)
    known = set(mods)
    graph = {m: imports(m, p, known) for m, p in mods.items()}
    problems = []
    for m, deps in sorted(graph.items()):
        lm = layer_of(m, package, layers)
        if lm is None:
            problems.append(f"{m}: not placed in any layer (add it to the layer map)")
            continue
        for d in sorted(deps):
            ld = layer_of(d, package, layers)
            if ld is None:
                continue  # reported as a module of its own
            if ld == TOP:
                problems.append(f"{m} imports the package facade {d} (import the defining module)")
            elif ld[0] > lm[0]:
                problems.append(f"upward import: {m} ({lm[1]}) imports {d} ({ld[1]})")
            elif ld[0] == lm[0] and ld[1] != lm[1]:
                problems.append(f"sibling import: {m} ({lm[1]}) imports {d} ({ld[1]})")
    names = sorted(graph)
    index = {m: i for i, m in enumerate(names)}
    rows = [index[m] for m in names for _ in graph[m]]
    cols = [index[d] for m in names for d in graph[m]]
    adj = csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(names), len(names)))
    _, labels = connected_components(adj, directed=True, connection="strong")
    for lab in np.unique(labels):
        members = [names[i] for i in np.flatnonzero(labels == lab)]
        if len(members) > 1:
            problems.append("import cycle: " + " ↔ ".join(members))
    return problems


def test_distpen_layers_point_down_and_have_no_cycles():
    assert check(ROOT, "distpen", LAYERS) == []


def test_every_layer_is_a_folder_or_a_floor_module():
    mods = modules(ROOT, "distpen")
    for layer in ("penalties", "sources", "coactivation", "curvature", "dashboard", "cli"):
        assert (ROOT / "distpen" / layer / "__init__.py").is_file(), layer
    for m, path in mods.items():
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text))
        assert doc, f"{m} has no module docstring saying what it holds"


def test_no_comment_or_docstring_names_an_issue():
    pattern = re.compile(r"\bissue\s*#?\s*\d+|\bissue\s+#", re.IGNORECASE)
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
            for p in sorted((ROOT / "distpen").rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


# ---------------------------------------------------------------------------- planted trees
def plant(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        f = tmp_path / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(text))
    return tmp_path


FAKE_LAYERS = {"errors": (0, "floor"), "penalties": (2, "penalties"), "coactivation": (4, "coactivation"),
               "curvature": (4, "curvature"), "cli": (6, "cli")}
CLEAN = {
    "fake/__init__.py": '"""f"""\nfrom .coactivation import job\n',
    "fake/errors.py": '"""e"""\n',
    "fake/penalties/__init__.py": '"""p"""\nfrom ..errors import *\n',
    "fake/coactivation/__init__.py": '"""c"""\nfrom .job import run\n',
    "fake/coactivation/job.py": '"""j"""\nfrom ..penalties import x\nfrom . import plan\n',
    "fake/coactivation/plan.py": '"""p"""\nimport fake.errors\n',
    "fake/curvature/__init__.py": '"""v"""\n',
    "fake/cli/__init__.py": '"""c"""\nfrom ..coactivation.job import run\nfrom ..curvature import y\n',
}


def test_checker_accepts_a_clean_tree(tmp_path):
    assert check(plant(tmp_path, CLEAN), "fake", FAKE_LAYERS) == []


def test_checker_finds_a_planted_upward_import(tmp_path):
    tree = dict(CLEAN)
    # inside a function, as lazy imports are written: still an upward import
    tree["fake/penalties/__init__.py"] = '"""p"""\ndef f():\n    from ..cli import main\n'
    problems = check(plant(tmp_path, tree), "fake", FAKE_LAYERS)
    # cli → coactivation.job → penalties → cli: the upward edge also closes a cycle
    assert problems == ["upward import: fake.penalties (penalties) imports fake.cli (cli)",
                        "import cycle: fake.cli ↔ fake.coactivation.job ↔ fake.penalties"]


def test_checker_finds_a_sibling_import_and_the_facade(tmp_path):
    tree = dict(CLEAN)
    tree["fake/curvature/__init__.py"] = '"""v"""\nfrom ..coactivation import plan\nimport fake\n'
    problems = check(plant(tmp_path, tree), "fake", FAKE_LAYERS)
    assert "sibling import: fake.curvature (curvature) imports fake.coactivation.plan (coactivation)" in problems
    assert any("imports the package facade fake" in p for p in problems)


def test_checker_finds_a_planted_cycle_and_an_unplaced_module(tmp_path):
    tree = dict(CLEAN)
    tree["fake/coactivation/plan.py"] = '"""p"""\nfrom .job import thing\n'
    tree["fake/extra.py"] = '"""x"""\n'
    problems = check(plant(tmp_path, tree), "fake", FAKE_LAYERS)
    assert "import cycle: fake.coactivation.job ↔ fake.coactivation.plan" in problems
    assert "fake.extra: not placed in any layer (add it to the layer map)" in problems


@pytest.mark.parametrize("src, expected", [
    ("from . import plan", {"fake.coactivation.plan"}),
    ("from .plan import thing", {"fake.coactivation.plan"}),
    ("from .. import errors", {"fake.errors"}),
    ("from ..penalties import x", {"fake.penalties"}),
    ("import fake.errors", {"fake.errors"}),
    ("import numpy, os", set()),
])
def test_imports_resolve_to_the_modules_they_name(tmp_path, src, expected):
    root = plant(tmp_path, {**CLEAN, "fake/coactivation/job.py": f'"""j"""\n{src}\n'})
    mods = modules(root, "fake")
    assert imports("fake.coactivation.job", mods["fake.coactivation.job"], set(mods)) == expected
