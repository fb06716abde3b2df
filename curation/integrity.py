"""Cross-stage integrity: row counts that must agree along pairs -> downloads -> clip -> dedupe per partition."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import io
from curation import records as R
from curation.layout import Lake, Partition


def _rows(path: str) -> int | None:
    fs, p = io.filesystem(path)
    if not fs.exists(p):
        return None
    with fs.open(p, "rb") as f:
        return int(pq.ParquetFile(f).metadata.num_rows)


def _kept(path: str) -> int:
    fs, p = io.filesystem(path)
    keep = pq.read_table(p, columns=[R.KEEP], filesystem=fs).column(R.KEEP)
    return int(pc.sum(pc.fill_null(keep, False)).as_py() or 0)


def partition_counts(lake_root: str, part: Partition) -> dict[str, int | None]:
    """Rows of each stage's table for one partition (None where the table is absent) and the clip-kept rows."""
    lake = Lake(lake_root)
    counts: dict[str, int | None] = {s: _rows(lake.table(s, part)) for s in ("pairs", "downloads", "clip", "dedupe")}
    counts["clip_kept"] = _kept(lake.table("clip", part)) if counts["clip"] is not None else None
    return counts


def verify_partition_counts(lake_root: str, partitions: Sequence[Partition]) -> list[str]:
    """Where counts disagree: downloads and clip hold one row per pair, dedupe one row per kept clip row."""
    problems = []
    for part in partitions:
        c = partition_counts(lake_root, part)
        if c["pairs"] is None:
            problems.append(f"{part.key}: no pairs table")
            continue
        for stage in ("downloads", "clip"):
            if c[stage] is not None and c[stage] != c["pairs"]:
                problems.append(f"{part.key}: {c[stage]} {stage} rows for {c['pairs']} pairs")
        if c["dedupe"] is not None and c["dedupe"] != c["clip_kept"]:
            problems.append(f"{part.key}: {c['dedupe']} dedupe rows for {c['clip_kept']} kept clip rows")
    return problems
