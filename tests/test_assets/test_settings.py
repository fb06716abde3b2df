"""Configuration errors surface when the definitions load (and from `curation run`) as one line naming the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from assets.definitions import build_definitions
from curation.cli import main
from curation.models import SPEC_KEYS
from resources.settings import Settings, env_flag, lake_write_problem, read_models_spec

VARIABLES = ("CURATION_LAKE", "CURATION_COMPUTE", "CURATION_CLIP_SPEC", "CURATION_SUBSETS",
             "CURATION_ALLOW_LOOPBACK", "CURATION_CLIP_DEVICE", "CURATION_CLIP_GPUS", "CURATION_INDEX_GPUS",
             "CURATION_CPU_STAGES", "CURATION_EXPLORER_URL")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CURATION_LAKE", str(tmp_path / "lake"))


def load_error(kind: type[Exception] = ValueError) -> str:
    """Load the definitions as the UI does; the error must be one line, with no chained cause to print."""
    with pytest.raises(kind) as caught:
        build_definitions(Settings.from_env())
    message = str(caught.value)
    assert "\n" not in message and caught.value.__cause__ is None, message
    return message


def run_error(capsys: pytest.CaptureFixture[str], tmp_path: Path, *flags: str) -> str:
    """`curation run` with the same setting: exit status 2, one line, before any crawl is read."""
    assert main(["run", "--crawl-root", str(tmp_path / "no-web"), "--lake", str(tmp_path / "lake"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("curation run: ")
    return err.removeprefix("curation run: ")


def test_unknown_compute(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.setenv("CURATION_COMPUTE", "foo")
    message = load_error()
    assert message.startswith("CURATION_COMPUTE must be one of local, slurm, got 'foo'") and "unset it" in message
    assert run_error(capsys, tmp_path) == message


def test_unwritable_lake(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    lake = blocker / "lake"
    monkeypatch.setenv("CURATION_LAKE", str(lake))
    message = load_error()
    assert message == (f"CURATION_LAKE: cannot write to the lake at {lake} ([Errno 20] Not a directory: {blocker}); "
                       "point CURATION_LAKE (or `curation run --lake`) at a folder you can write")
    # `curation run --lake` replaces the variable: a bad CURATION_LAKE is not read, a bad --lake is refused.
    assert main(["run", "--crawl-root", str(tmp_path / "no-web"), "--lake", str(tmp_path / "fine")]) == 2
    captured = capsys.readouterr()
    assert "no crawl listing found" in captured.out and "CURATION_LAKE" not in captured.err
    assert main(["run", "--crawl-root", str(tmp_path), "--lake", str(blocker)]) == 2
    assert f"cannot write to the lake at {blocker} ([Errno 20] Not a directory" in capsys.readouterr().err


def test_lake_check_creates_nothing_and_skips_object_stores(tmp_path: Path) -> None:
    assert lake_write_problem(str(tmp_path / "new" / "lake")) is None
    assert not (tmp_path / "new").exists()
    assert lake_write_problem(f"file://{tmp_path}") is None
    assert lake_write_problem("s3://some-bucket/lake") is None  # not probed: no request is made
    (tmp_path / "f").write_text("")
    assert lake_write_problem(str(tmp_path / "f")) == f"[Errno 20] Not a directory: {tmp_path / 'f'}"


@pytest.mark.parametrize(("content", "kind", "expected"), [
    (None, FileNotFoundError, "the models spec {path} does not exist; write one"),
    ('{"model_name": "ViT-B-32",\n  "pretrained": }', ValueError,
     "the models spec {path} is not valid JSON: Expecting value at line 2 column 17"),
    ('["ViT-B-32"]', ValueError, "the models spec {path} must be a JSON object"),
    ('{"model_name": "ViT-B-32", "pretrianed": "openai"}', ValueError,
     "the models spec {path} has unknown keys ['pretrianed']"),
    ('{"pretrained": "openai"}', ValueError, "the models spec {path} needs 'model_name'"),
    ('{"model_name": "toy-clip", "heads": {"punsafe": "/nonexistent/head.pt"}}', FileNotFoundError,
     "head checkpoints in the models spec {path} do not exist: ['punsafe: /nonexistent/head.pt']"),
])
def test_bad_models_spec(content: str | None, kind: type[Exception], expected: str, tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "models.json"
    if content is not None:
        spec.write_text(content)
    monkeypatch.setenv("CURATION_CLIP_SPEC", str(spec))
    message = load_error(kind)
    assert message.startswith("CURATION_CLIP_SPEC: ") and expected.format(path=spec) in message, message
    assert run_error(capsys, tmp_path) == message  # --clip-spec defaults to the variable
    monkeypatch.delenv("CURATION_CLIP_SPEC")
    assert run_error(capsys, tmp_path, "--clip-spec", str(spec)) == message


def test_a_good_models_spec_is_what_the_clip_resource_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = {"model_name": "toy-clip", "pretrained": None, "threshold_en": 0.3, "threshold_other": 0.2}
    (tmp_path / "models.json").write_text(json.dumps(spec))
    monkeypatch.setenv("CURATION_CLIP_SPEC", str(tmp_path / "models.json"))
    defs = build_definitions(Settings.from_env())
    assert defs.resources["clip_model"].spec() == spec


def test_spec_keys_are_the_scorings() -> None:
    """The early check knows exactly the keys `ScoringConfig.from_spec` reads (it lists them when refusing)."""
    from curation.scoring import ScoringConfig

    with pytest.raises(ValueError) as caught:
        ScoringConfig.from_spec({"model_name": "ViT-B-32", "no_such_key": 1})
    assert str(caught.value).endswith(f"known: {sorted(SPEC_KEYS)}")


def test_missing_subsets_registry(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CURATION_SUBSETS", str(tmp_path / "subsets.yaml"))
    message = load_error()
    assert message.startswith(f"CURATION_SUBSETS: cannot load the subsets registry {tmp_path / 'subsets.yaml'} (")
    assert message.endswith("fix it or unset CURATION_SUBSETS")


@pytest.mark.parametrize(("value", "expected"), [
    ("1", True), ("true", True), ("TRUE", True), ("Yes", True), ("on", True), (" ON ", True),
    ("0", False), ("false", False), ("False", False), ("no", False), ("OFF", False), ("", False),
])
def test_booleans_are_read_case_insensitively(value: str, expected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CURATION_ALLOW_LOOPBACK", value)
    assert Settings.from_env().allow_loopback is expected


@pytest.mark.parametrize("value", ["2", "enabled", "ture"])
def test_other_boolean_values_are_refused(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CURATION_ALLOW_LOOPBACK", value)
    with pytest.raises(ValueError, match=f"CURATION_ALLOW_LOOPBACK must be a boolean .* got '{value}'"):
        Settings.from_env()
    assert env_flag("CURATION_UNSET_FLAG_FOR_TEST") is False


def test_read_models_spec_returns_the_file(tmp_path: Path) -> None:
    head = tmp_path / "punsafe.pt"
    head.write_bytes(b"weights")
    spec = {"model_name": "toy-clip", "pretrained": "x.pt", "heads": {"punsafe": str(head)}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert read_models_spec(str(tmp_path / "spec.json")) == spec


def test_explorer_url_is_an_http_url(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings.from_env().explorer_url is None
    monkeypatch.setenv("CURATION_EXPLORER_URL", "127.0.0.1:1234")
    assert load_error() == ("CURATION_EXPLORER_URL must be an http(s) URL (where `curation serve` runs), "
                            "got '127.0.0.1:1234'")
    monkeypatch.setenv("CURATION_EXPLORER_URL", " http://127.0.0.1:1234/ ")
    assert Settings.from_env().explorer_url == "http://127.0.0.1:1234/"
