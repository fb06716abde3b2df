"""The `dedupe` asset on the scored fixture web, measured against its planted duplicates."""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq

from curation import records as R
from curation.dedupe import DedupeConfig, dedupe_lake
from curation.io import finished_partitions
from curation.layout import Lake
from tests.conftest import SampleWeb


def _rows(lake: Path, sample_web: SampleWeb) -> list[dict[str, Any]]:
    """Every dedupe row with its pair's truth (by URL)."""
    p = pa.concat_tables(pq.read_table(f).select([R.UID, R.URL]) for f in sorted(lake.glob("pairs/*/*/pairs.parquet")))
    d = pa.concat_tables(pq.read_table(f) for f in sorted(lake.glob("dedupe/crawl=*/*/dedupe.parquet")))
    url = dict(zip(p.column(R.UID).to_pylist(), p.column(R.URL).to_pylist(), strict=True))
    truth = {str(t["url"]): t for t in sample_web.truth()}
    return [{**row, "truth": truth[url[row[R.UID]]]} for row in d.to_pylist()]


def _identity(t: dict[str, Any]) -> str:
    """What truth says a row's image is: its near-duplicate group, else its served bytes."""
    return f"group:{t['dup_group']}" if t["dup_group"] is not None else f"bytes:{t['sha256']}"


def test_materializes_with_checks_and_gallery(deduped: tuple[Path, dg.ExecuteInProcessResult]) -> None:
    lake, result = deduped
    assert result.success
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks == {"one_survivor_per_cluster": True, "rows_match_kept_clip": True, "partition_counts_agree": True}
    [mat] = result.asset_materializations_for_node("dedupe")
    assert mat.metadata["duplicates_removed"].value > 0
    assert "data:image/png;base64," in mat.metadata["gallery"].value
    assert len(list(lake.glob("dedupe/crawl=*/segment=*/dedupe.parquet"))) == 2


def test_planted_duplicates_merged_and_distinct_images_kept_apart(
    deduped: tuple[Path, dg.ExecuteInProcessResult], sample_web: SampleWeb
) -> None:
    """Rows whose images truth calls the same (byte copies, near-duplicate groups) share a cluster >= 95 % of
    the time; rows in a cluster with an image truth calls different <= 1 %."""
    lake, _ = deduped
    rows = _rows(lake, sample_web)
    by_identity: dict[str, list[dict[str, Any]]] = defaultdict(list)
    by_cluster: dict[int, set[str]] = defaultdict(set)
    for r in rows:
        by_identity[_identity(r["truth"])].append(r)
        by_cluster[r["cluster_id"]].add(_identity(r["truth"]))
    same = [(a["cluster_id"] == b["cluster_id"]) for group in by_identity.values()
            for i, a in enumerate(group) for b in group[i + 1:]]
    assert len(same) >= 20, "the fixture web should plant duplicates among kept rows"
    assert sum(same) / len(same) >= 0.95, (sum(same), len(same))
    wrong = [len(by_cluster[r["cluster_id"]]) > 1 for r in rows]
    assert sum(wrong) / len(wrong) <= 0.01, (sum(wrong), len(wrong))
    reasons = {r["reason"] for r in rows if not r["survivor"]}
    assert {"duplicate_bytes", "near_duplicate_phash"} <= reasons, reasons


def test_survivor_is_the_best_of_its_cluster(deduped: tuple[Path, dg.ExecuteInProcessResult]) -> None:
    lake, _ = deduped
    clip = pa.concat_tables(pq.read_table(f).select([R.UID, R.SIMILARITY]) for f in lake.glob("clip/*/*/clip.parquet"))
    sim = dict(zip(clip.column(R.UID).to_pylist(), clip.column(R.SIMILARITY).to_pylist(), strict=True))
    d = pa.concat_tables(pq.read_table(f) for f in lake.glob("dedupe/crawl=*/*/dedupe.parquet")).to_pylist()
    clusters: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in d:
        clusters[r["cluster_id"]].append(r)
    for cid, members in clusters.items():
        [survivor] = [m for m in members if m["survivor"]]
        assert survivor[R.UID] == cid
        assert sim[survivor[R.UID]] == max(sim[m[R.UID]] for m in members)


def test_incremental_equals_one_shot_and_rerun_is_identical(
    scored_lake: tuple[Path, list[dg.ExecuteInProcessResult]], tmp_path: Path
) -> None:
    config = DedupeConfig()
    one, two = tmp_path / "one" / "lake", tmp_path / "two" / "lake"
    shutil.copytree(scored_lake[0], one)
    shutil.copytree(scored_lake[0], two)
    parts = finished_partitions(Lake(str(one)).stage_dir("clip"))
    assert len(parts) == 2
    dedupe_lake(str(one), parts, config)
    dedupe_lake(str(two), parts[:1], config)
    dedupe_lake(str(two), parts, config)
    for part in parts:
        a = pq.read_table(Lake(str(one)).table("dedupe", part))
        b = pq.read_table(Lake(str(two)).table("dedupe", part))
        assert a.equals(b), part
    before = {p: Path(Lake(str(one)).table("dedupe", p)).read_bytes() for p in parts}
    again = dedupe_lake(str(one), parts, config)
    assert again.partitions_rewritten == ()
    assert {p: Path(Lake(str(one)).table("dedupe", p)).read_bytes() for p in parts} == before
