"""Scoring a lake partition: the clip table, heads, tags, model identity, the verification and the report."""

from __future__ import annotations

import base64
import io
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from curation import plots
from curation import records as R
from curation.heads import HeadTrainConfig, train_head
from curation.io import file_sha256, read_marker, remove, write_marker, write_parquet
from curation.layout import Lake, Partition
from curation.models import checkpoint_identity
from curation.scoring import (
    ScoringConfig,
    score_partition,
    verify_clip_partition,
)
from curation.stages import materialize_clip
from tests.test_curation.conftest import TINY_CONFIG
from tests.test_curation.test_clip import make_partition

PART = Partition("CC-TEST-2024-01", "000")


@pytest.fixture
def lake(tmp_path: Path) -> tuple[str, Any]:
    """A lake with one partition's pairs and downloads tables and img2dataset-shaped shards."""
    made = make_partition(tmp_path / "made")
    lake = Lake(str(tmp_path / "lake"))
    write_parquet(made.pairs, lake.table("pairs", PART))
    write_parquet(made.downloads, lake.table("downloads", PART))
    shutil.copytree(made.shards_dir, lake.shards_dir(PART))
    for stage in ("pairs", "downloads"):
        write_marker(lake.partition_dir(stage, PART), {"rows": made.pairs.num_rows})
    return lake.root, made


@pytest.fixture(scope="module")
def heads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    rng = np.random.default_rng(0)
    dim = int(TINY_CONFIG["embed_dim"])  # type: ignore[call-overload]
    x = rng.normal(size=(64, dim)).astype(np.float32)
    labels = {"punsafe": (x[:, 0] > 0).astype(np.float32), "pwatermark": (x[:, 1] > 0).astype(np.float32),
              "aesthetic": 5 + 2 * x[:, 2]}
    out = tmp_path_factory.mktemp("heads")
    paths = {}
    for kind, y in labels.items():
        path = str(out / f"{kind}.pt")
        train_head(x, y, HeadTrainConfig(kind=kind, epochs=3), path, clip_model="tiny")
        paths[kind] = path
    return paths


def spec_of(name: str, heads: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"model_name": name, "pretrained": None, "threshold_en": 0.0, "threshold_other": 0.0,
                            "nsfw_prompt_sets": {"neutral": ["a photo", "a drawing"],
                                                 "hazard": ["a hazard sign", "danger stripes"]},
                            "unsafe_sets": ["hazard"]}
    if heads is not None:
        spec["heads"] = heads
    return {**spec, **extra}


def config_of(spec: dict[str, Any]) -> ScoringConfig:
    return ScoringConfig.from_spec(spec, device="cpu", precision="fp32", batch_size=3, num_workers=0)


def test_scores_every_pair_with_model_and_head_identity(lake: tuple[str, Any], heads: dict[str, str],
                                                         tiny_model_name: str) -> None:
    root, made = lake
    torch.manual_seed(0)
    result = score_partition(root, PART, config_of(spec_of(tiny_model_name, heads)))
    table = pq.read_table(Lake(root).table("clip", PART))
    assert table.equals(result.table)
    assert set(R.SCORE_COLUMNS) <= set(table.column_names)
    assert table.num_rows == made.pairs.num_rows
    rows = {r[R.UID]: r for r in table.to_pylist()}
    ok = [r for r in rows.values() if r[R.STATUS] == R.STATUS_OK]
    assert len(ok) == len(made.image_bytes) == result.clip_pass.n_embedded
    for r in ok:
        assert 0.0 <= r["punsafe"] <= 1.0 and 0.0 <= r["pwatermark"] <= 1.0
        assert r["aesthetic"] is not None and r[R.NSFW_TAG] in ("UNLIKELY", "UNSURE", "NSFW")
    bad = rows[made.corrupt_uid]
    assert bad[R.STATUS] == R.STATUS_FAILED_DECODE and bad[R.REASON] == R.STATUS_FAILED_DECODE
    assert bad["punsafe"] is None and bad[R.NSFW_TAG] is None and bad[R.KEEP] is False
    assert {r[R.CLIP_CHECKPOINT] for r in rows.values()} == {"random-init"}
    for kind, column in R.HEAD_COLUMNS.items():
        assert {r[column] for r in rows.values()} == {file_sha256(heads[kind])}
    marker = read_marker(Lake(root).partition_dir("clip", PART))
    assert marker is not None and marker["embedded"] == len(ok) and marker["heads"]["punsafe"] == file_sha256(
        heads["punsafe"])
    assert verify_clip_partition(root, PART) == []


def test_a_rerun_writes_identical_files(lake: tuple[str, Any], heads: dict[str, str], tiny_model_name: str) -> None:
    root, _ = lake
    emb = Path(Lake(root).embeddings_dir(PART))
    outputs = []
    for _ in range(2):
        torch.manual_seed(0)
        score_partition(root, PART, config_of(spec_of(tiny_model_name, heads)))
        outputs.append((pq.read_table(Lake(root).table("clip", PART)),
                        {f.name: f.read_bytes() for f in sorted(emb.glob("*.npy"))}))
    assert outputs[0][0].equals(outputs[1][0])
    assert outputs[0][1] == outputs[1][1]


def test_without_heads_scores_are_null_but_tags_remain(lake: tuple[str, Any], tiny_model_name: str) -> None:
    root, _ = lake
    result = score_partition(root, PART, config_of(spec_of(tiny_model_name)))
    ok = [r for r in result.table.to_pylist() if r[R.STATUS] == R.STATUS_OK]
    assert ok and all(r["punsafe"] is None and r["aesthetic"] is None and r[R.NSFW_TAG] for r in ok)
    assert result.head_sha256 == {}
    assert verify_clip_partition(root, PART) == []


def test_verification_catches_misaligned_embeddings(lake: tuple[str, Any], heads: dict[str, str],
                                                    tiny_model_name: str) -> None:
    root, _ = lake
    score_partition(root, PART, config_of(spec_of(tiny_model_name, heads)))
    uids_path = Path(Lake(root).embeddings_dir(PART)) / "uids.npy"
    uids = np.load(uids_path)
    np.save(uids_path, uids[::-1].copy())
    problems = verify_clip_partition(root, PART)
    assert any("uids.npy" in p for p in problems)
    np.save(uids_path, uids[:-1])
    assert any("rows for" in p for p in verify_clip_partition(root, PART))


def test_head_of_another_dimension_is_refused(lake: tuple[str, Any], tmp_path: Path, tiny_model_name: str) -> None:
    root, _ = lake
    path = str(tmp_path / "wide.pt")
    train_head(np.ones((4, 48), np.float32), np.array([0, 1, 0, 1], np.float32), HeadTrainConfig(kind="punsafe",
               epochs=1), path, clip_model="other")
    with pytest.raises(ValueError, match="train the head on this model"):
        score_partition(root, PART, config_of(spec_of(tiny_model_name, {"punsafe": path})))


def test_missing_upstream_table_names_the_stage(tmp_path: Path, tiny_model_name: str) -> None:
    with pytest.raises(FileNotFoundError, match="materialize pairs"):
        score_partition(str(tmp_path / "empty-lake"), PART, config_of(spec_of(tiny_model_name)))


def test_an_unfinished_upstream_partition_is_not_read(lake: tuple[str, Any], tiny_model_name: str) -> None:
    root, _ = lake
    remove(Lake(root).marker("downloads", PART))  # a downloads rerun killed half-way: its table may be stale
    with pytest.raises(FileNotFoundError, match=re.escape("downloads of CC-TEST-2024-01|000 is not finished")):
        score_partition(root, PART, config_of(spec_of(tiny_model_name)))
    assert not Path(Lake(root).table("clip", PART)).exists()


@pytest.mark.parametrize(("change", "error"), [
    ({"surprise": 1}, "unknown models-spec keys"),
    ({"model_name": ""}, "model_name"),
    ({"threshold_en": None}, "randomly initialised"),
    ({"heads": {"punsafe": "/nonexistent/head.pt"}}, "does not exist"),
    ({"heads": {"beauty": "/nonexistent/head.pt"}}, "does not exist|heads must name"),
    ({"unsafe_sets": ["sexual"]}, "unsafe_sets"),
    ({"unsafe_sets": ["hazard", "neutral"]}, "one unsafe and one safe"),
])
def test_spec_validation(change: dict[str, Any], error: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        ScoringConfig.from_spec(spec_of("ViT-B-32", **change))


def test_spec_thresholds_default_to_the_models_recorded_ones() -> None:
    config = ScoringConfig.from_spec({"model_name": "ViT-B-32", "pretrained": "openai"})
    assert (config.clip.threshold_en, config.clip.threshold_other) == (0.28, 0.26)
    with pytest.raises(KeyError, match="calibrate"):
        ScoringConfig.from_spec({"model_name": "ViT-L-14", "pretrained": "openai"})


def test_checkpoint_identity(tmp_path: Path) -> None:
    f = tmp_path / "w.pt"
    f.write_bytes(b"weights")
    assert checkpoint_identity(str(f)) == "sha256:" + file_sha256(str(f))
    assert checkpoint_identity("openai") == "openai"
    assert checkpoint_identity(None) == "random-init"


def _png(markdown: str) -> Image.Image:
    data = markdown.split("base64,", 1)[1].split(")", 1)[0]
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_clip_report_has_counts_inline_charts_and_its_check(lake: tuple[str, Any], heads: dict[str, str],
                                                             tiny_model_name: str) -> None:
    root, made = lake
    options = {"device": "cpu", "precision": "fp32", "batch_size": 3, "num_workers": 0}
    report = materialize_clip(root, PART, spec_of(tiny_model_name, heads), options)
    meta = report.metadata
    assert meta["dagster/row_count"] == ("int", made.pairs.num_rows)
    assert meta["embedded"] == ("int", len(made.image_bytes))
    charts = meta["charts"][1].split("\n\n")
    assert len(charts) == 2 + 3  # funnel, similarity, one per head
    assert all(_png(c).format == "PNG" for c in charts)
    assert "failed_to_decode" in meta["by_reason"][1]
    [check] = report.checks
    assert (check.name, check.passed, check.metadata["problems"]) == ("embeddings_aligned", True, ("text", "none"))


def test_histogram_counts_are_drawn_to_scale() -> None:
    """Two bins with 30 and 10 values: the taller bar is three times the shorter one."""
    png = plots.histogram_png([0.1] * 30 + [0.9] * 10, title="t", bins=2, value_range=(0.0, 1.0))
    img = np.array(Image.open(io.BytesIO(png)).convert("RGB"))
    bar = np.all(img == plots.BAR, axis=2)
    heights = [int(bar[:, c].sum()) for c in (plots.MARGIN_L + 60, plots.WIDTH - plots.MARGIN_R - 60)]
    assert heights[1] > 0 and abs(heights[0] / heights[1] - 3.0) < 0.1
    assert Image.open(io.BytesIO(plots.histogram_png([], title="empty"))).size == (plots.WIDTH, plots.HEIGHT)
