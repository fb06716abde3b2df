"""The `curation` command: light to start, refusals as one line with exit status 2, bugs as tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import curation.sql as sql_module
from curation.cli import main
from curation.subsets import SubsetDefinition
from tests.test_curation.test_subsets import ROWS, write_lake

ROOT = Path(__file__).resolve().parents[2]
# Settings that break the Dagster definitions, and so would break every command that loaded them.
BROKEN_DAGSTER_ENV = {"CURATION_COMPUTE": "foo", "CURATION_SUBSETS": "/nonexistent/subsets.yaml"}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "curation.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def refusal(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run a command that must be refused: exit status 2 and one line `curation <command>: ...` on stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_commands_never_load_dagster(tmp_path: Path) -> None:
    """Only `run` needs Dagster: building the parser (every entry point's subparser included) imports none of
    it, so `--help` and `sql` start fast and do not care what the Dagster settings say."""
    probe = ("import json, sys\nfrom curation.cli import build_parser\nbuild_parser()\n"
             "heavy = ('dagster', 'dagster_slurm', 'torch', 'open_clip', 'assets.runner', 'assets.wiring',\n"
             "         'assets.definitions', 'resources.settings')\n"
             "print(json.dumps([m for m in heavy if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, **BROKEN_DAGSTER_ENV}, timeout=300)
    assert json.loads(out.stdout) == []

    helped = run_cli("--help", env=BROKEN_DAGSTER_ENV)
    assert helped.returncode == 0, helped.stderr
    assert "run" in helped.stdout and "sql" in helped.stdout
    run_help = run_cli("run", "--help", env=BROKEN_DAGSTER_ENV)
    assert run_help.returncode == 0 and "--crawl-root" in run_help.stdout, run_help.stderr

    write_lake(tmp_path, ROWS)
    queried = run_cli("sql", str(tmp_path), "SELECT count(*) AS n FROM pairs", "--format", "json",
                       env=BROKEN_DAGSTER_ENV)
    assert queried.returncode == 0, queried.stderr
    assert json.loads(queried.stdout) == {"n": len(ROWS)}


def test_run_refuses_a_bad_setting_in_one_line(tmp_path: Path) -> None:
    done = run_cli("run", "--crawl-root", str(tmp_path / "web"), "--lake", str(tmp_path / "lake"),
                    env={"CURATION_COMPUTE": "foo"})
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("curation run: CURATION_COMPUTE must be one of local, slurm, got 'foo'")


def test_sql_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_lake(tmp_path / "lake", ROWS)
    err = refusal(capsys, ["sql", str(tmp_path / "lake"), "SELEC count(*) FROM pairs"])
    assert err.startswith("curation sql: Parser Error: syntax error")
    err = refusal(capsys, ["sql", str(tmp_path / "lake"), "SELECT count(*) FROM pears"])
    assert err.startswith("curation sql: Catalog Error") and "views: pairs, downloads, clip, dedupe" in err

    err = refusal(capsys, ["sql", str(tmp_path / "missing"), "SELECT 1"])
    assert err == f"curation sql: no lake at {tmp_path / 'missing'} (the folder does not exist)"
    (tmp_path / "empty").mkdir()
    err = refusal(capsys, ["sql", str(tmp_path / "empty"), "SELECT count(*) FROM pairs"])
    assert "pairs" in err and "none, no finished partitions yet" in err


def test_deliberate_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.warc.wat.gz"
    empty.write_bytes(b"")
    for wat in (empty, tmp_path / "missing.warc.wat.gz"):
        assert refusal(capsys, ["extract", str(wat), "-o", str(tmp_path / "pairs.parquet")]).startswith(
            "curation extract: ")
    assert not (tmp_path / "pairs.parquet").exists()

    spec = tmp_path / "spec.json"
    spec.write_text('{"model_name": "toy-clip",\n "pretrained": }\n')
    err = refusal(capsys, ["score", str(tmp_path), "--crawl", "CC-MAIN-2030-01", "--segment", "000",
                           "--spec", str(spec)])
    assert err == f"curation score: --spec {spec} is not valid JSON: Expecting value at line 2 column 16"

    err = refusal(capsys, ["index", "search", str(tmp_path), "--text", "x", "--spec", str(tmp_path / "nope.json")])
    assert err.startswith("curation index search: ") and "nope.json" in err


def test_bugs_keep_their_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the errors the core raises on purpose are shortened; anything else is a bug to report."""
    def broken(lake_root: str) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(sql_module, "connect", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["sql", str(tmp_path), "SELECT 1"])


def test_subset_export_params(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_lake(tmp_path / "lake", ROWS)
    lake = str(tmp_path / "lake")
    registry = tmp_path / "subsets.json"
    registry.write_text(json.dumps({"subsets": [{
        "name": "by_tag", "conditions": {"tag": "list_contains($tags, nsfw_tag)"}, "params": {"tags": ["NSFW"]},
        "survivors_only": False}]}))
    base = ["subset", "export", lake, "by_tag", "--registry", str(registry)]

    assert main([*base, "--param", 'tags=["UNSURE", "UNLIKELY"]']) == 0  # a list, not its characters
    out = capsys.readouterr().out
    assert "by_tag release 1 (new release): 5 rows" in out, out
    release = json.loads((tmp_path / "lake/subsets/by_tag/release-000001/release.json").read_text())
    assert release["params"] == {"tags": ["UNSURE", "UNLIKELY"]}

    err = refusal(capsys, [*base, "--param", "tags=UNLIKELY"])
    assert err == ("curation subset export: subset by_tag: parameter tags='UNLIKELY' is not a list "
                   '(give JSON, e.g. ["NSFW"])')
    err = refusal(capsys, [*base, "--param", "tags"])
    assert err == "curation subset export: --param needs NAME=VALUE, got 'tags'"
    err = refusal(capsys, ["subset", "export", lake, "no_such_subset"])
    assert err.startswith("curation subset export: no subset 'no_such_subset'")


@pytest.mark.parametrize("condition", [
    "true), true) OR (true",          # closes the coalesce((...), false) it is wrapped in
    "aesthetic > 1), (true",          # a second select item
    "true) FROM candidates WHERE (true",
    "true) UNION SELECT (true",
    "true) ORDER BY (1",
    "true -- the closing parenthesis is commented out",
    "",
])
def test_a_condition_must_be_one_standalone_expression(condition: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="subset odd: condition sneaky must be one standalone expression"):
        SubsetDefinition("odd", "", (("sneaky", condition),))
    registry = tmp_path / "subsets.json"
    registry.write_text(json.dumps([{"name": "odd", "conditions": {"sneaky": condition}}]))
    err = refusal(capsys, ["subset", "list", "--registry", str(registry)])
    assert err.startswith("curation subset list: subset odd: condition sneaky must be one standalone expression")


def test_conditions_that_are_one_expression_pass(tmp_path: Path) -> None:
    """Parentheses inside strings and subqueries are fine; the condition still runs as written."""
    write_lake(tmp_path, ROWS)
    from curation.subsets import sandboxed_candidates, select

    defn = SubsetDefinition("fine", "", (("a", "caption <> 'x)' AND (uid IN (SELECT 1 UNION SELECT 4))"),
                                         ("b", "true) OR (false")), survivors_only=False)
    con = sandboxed_candidates(str(tmp_path))
    assert sorted(select(con, defn, {}).column("uid").to_pylist()) == [1, 4]
