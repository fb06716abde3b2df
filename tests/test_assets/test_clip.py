"""The `clip` asset through the compute resource on the served sample web, measured against its truth.

The models are the demo's: the toy CLIP and heads trained on the default sample web (seed 0). The web
scored here is the fixture web (seed 7), whose images none of the models saw, so every figure is held out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import spearmanr

from curation import records as R
from tests.conftest import SampleWeb
from tests.test_assets.conftest import SEGMENTS

# The targets, on the fixture web (seed 7), which neither the toy CLIP nor its heads saw.
WATERMARK_RECALL_FLOOR = 0.90
AESTHETIC_SPEARMAN_FLOOR = 0.80


@pytest.fixture(scope="module")
def scored(scored_lake: tuple[Path, list[dg.ExecuteInProcessResult]]) -> tuple[Path, list[dg.ExecuteInProcessResult]]:
    return scored_lake


def _rows(lake: Path, sample_web: SampleWeb) -> list[dict[str, Any]]:
    """Every clip row with its pair's truth (joined by URL)."""
    p = pa.concat_tables(pq.read_table(f).select([R.UID, R.URL]) for f in sorted(lake.glob("pairs/*/*/pairs.parquet")))
    c = pa.concat_tables(pq.read_table(f) for f in sorted(lake.glob("clip/*/*/clip.parquet")))
    url = dict(zip(p.column(R.UID).to_pylist(), p.column(R.URL).to_pylist(), strict=True))
    truth = {str(t["url"]): t for t in sample_web.truth()}
    return [{**row, "truth": truth[url[row[R.UID]]]} for row in c.to_pylist()]


def _rate(flags: list[bool]) -> float:
    assert flags, "no examples of this case in the sample web"
    return sum(flags) / len(flags)


def test_materializes_through_the_compute_resource_with_checks_and_charts(
    scored: tuple[Path, list[dg.ExecuteInProcessResult]],
) -> None:
    lake, results = scored
    for result in results:
        assert result.success
        checks = result.get_asset_check_evaluations()
        assert {c.check_name for c in checks if c.passed} >= {"embeddings_aligned", "shards_match_table"}
        [mat] = [m for m in result.asset_materializations_for_node("clip")]
        meta = mat.metadata
        assert meta["embedded"].value > 0
        assert meta["charts"].value.count("data:image/png;base64,") == 5
        assert meta["clip_checkpoint"].value.startswith("sha256:")
        assert meta["clip_model"].value == "toy-clip"
    assert len(list(lake.glob("clip/*/*/embeddings/img_emb.npy"))) == len(SEGMENTS)


def test_similarity_filter_against_truth(scored: tuple[Path, list[dg.ExecuteInProcessResult]],
                                         sample_web: SampleWeb) -> None:
    """Mismatched captions removed >= 95 %, matching ones kept >= 95 % (of the images that were embedded)."""
    lake, _ = scored
    ok = [r for r in _rows(lake, sample_web) if r[R.STATUS] == R.STATUS_OK]
    assert len(ok) > 300
    mismatched = [not r[R.KEEP] for r in ok if not r["truth"]["caption_matches"]]
    matched = [r[R.KEEP] for r in ok if r["truth"]["caption_matches"]]
    assert _rate(mismatched) >= 0.95, (_rate(mismatched), len(mismatched))
    assert _rate(matched) >= 0.95, (_rate(matched), len(matched))
    dropped = [r for r in ok if not r[R.KEEP]]
    assert {r[R.REASON] for r in dropped} == {R.DROP_LOW_SIMILARITY}


def test_safety_watermark_and_aesthetic_against_truth(scored: tuple[Path, list[dg.ExecuteInProcessResult]],
                                                      sample_web: SampleWeb) -> None:
    lake, _ = scored
    ok = [r for r in _rows(lake, sample_web) if r[R.STATUS] == R.STATUS_OK]
    unsafe = [r["punsafe"] > 0.5 for r in ok if r["truth"]["unsafe"]]
    safe = [r["punsafe"] > 0.5 for r in ok if not r["truth"]["unsafe"]]
    assert _rate(unsafe) >= 0.90, (_rate(unsafe), len(unsafe))
    assert _rate(safe) <= 0.05, (_rate(safe), len(safe))
    marked = [r["pwatermark"] > 0.8 for r in ok if r["truth"]["watermark"]]
    assert _rate(marked) >= WATERMARK_RECALL_FLOOR, (_rate(marked), len(marked))
    clean = [r["pwatermark"] > 0.8 for r in ok if not r["truth"]["watermark"]]
    assert _rate(clean) <= 0.05, (_rate(clean), len(clean))
    rho = spearmanr([r["aesthetic"] for r in ok], [r["truth"]["aesthetic"] for r in ok]).statistic
    assert rho >= AESTHETIC_SPEARMAN_FLOOR, rho
    # The zero-shot tag (prompt sets, no trained head) agrees with the unsafe truth too.
    tagged = [r["nsfw_tag"] != "UNLIKELY" for r in ok if r["truth"]["unsafe"]]
    assert _rate(tagged) >= 0.9, _rate(tagged)


def test_undecodable_and_undownloaded_rows_carry_reasons(scored: tuple[Path, list[dg.ExecuteInProcessResult]],
                                                         sample_web: SampleWeb) -> None:
    lake, _ = scored
    rows = _rows(lake, sample_web)
    by_status: dict[str, int] = {}
    for r in rows:
        by_status[r[R.STATUS]] = by_status.get(r[R.STATUS], 0) + 1
        if r[R.STATUS] != R.STATUS_OK:
            assert r[R.KEEP] is False and r[R.REASON] == r[R.STATUS] and r[R.SIMILARITY] is None
            assert r["punsafe"] is None and r["nsfw_tag"] is None
    assert by_status.get(R.STATUS_NOT_DOWNLOADED, 0) > 0
    expected_ok = sum(1 for r in rows if r["truth"]["expect_status"] == R.STATUS_SUCCESS)
    assert by_status[R.STATUS_OK] + by_status.get(R.STATUS_FAILED_DECODE, 0) == expected_ok
    emb = np.load(next(lake.glob("clip/*/segment=000/embeddings/img_emb.npy")))
    assert emb.dtype == np.float16
