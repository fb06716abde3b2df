"""Architecture: the core never imports Dagster, dependencies point assets -> resources -> curation, and the
sample world (curation/sample) stays in its wing."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


def test_core_never_imports_dagster_or_the_outer_layers() -> None:
    bad = {
        f: n & {"dagster", "dagster_slurm", "dagster_pipes", "assets", "resources"}
        for f, n in _imports("curation").items()
    }
    assert not {f: n for f, n in bad.items() if n}, bad
    assert len(bad) > 5  # the scan really read the package


def test_resources_never_import_assets() -> None:
    bad = {f: n & {"assets"} for f, n in _imports("resources").items()}
    assert not {f: n for f, n in bad.items() if n}


def test_every_module_opens_with_a_docstring() -> None:
    missing = [
        str(p.relative_to(ROOT))
        for pkg in ("curation", "assets", "resources")
        for p in (ROOT / pkg).rglob("*.py")
        if ast.get_docstring(ast.parse(p.read_text())) is None
    ]
    assert not missing, missing


def _sample_imports(path: Path) -> tuple[list[int], list[int]]:
    """Lines importing curation.sample in `path`: (at module level, inside a function)."""
    top: list[int] = []
    inner: list[int] = []
    tree = ast.parse(path.read_text(), str(path))
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    in_function = {id(n) for f in functions for n in ast.walk(f)}
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        if any(n == "curation.sample" or n.startswith("curation.sample.") for n in names):
            (inner if id(node) in in_function else top).append(node.lineno)
    return top, inner


def test_nothing_outside_the_sample_wing_imports_it() -> None:
    """The stages, assets and resources run on real crawls and checkpoints; only the CLI's sample commands load
    the sample world, lazily (inside the command), so no stage, job or payload ever imports it."""
    bad = {}
    checked = 0
    for pkg in ("curation", "assets", "resources"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT)
            if rel.parts[:2] == ("curation", "sample"):
                continue
            checked += 1
            top, inner = _sample_imports(path)
            allowed_inner = rel == Path("curation/cli.py")
            if top or (inner and not allowed_inner):
                bad[str(rel)] = top + ([] if allowed_inner else inner)
    assert not bad, bad
    assert checked > 20
    assert _sample_imports(ROOT / "curation" / "cli.py")[1], "the CLI's sample commands should import the wing lazily"


def test_functions_stay_short() -> None:
    """A function longer than this is cut at its seams (issue 14's rule): measured from def to last line."""
    limit = 80
    long = {}
    for pkg in ("curation", "assets", "resources"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    if lines > limit:
                        long[f"{path.relative_to(ROOT)}:{node.name}"] = lines
    assert not long, long
