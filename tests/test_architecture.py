"""Architecture: the core never imports Dagster, and dependencies point assets -> resources -> curation."""

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
