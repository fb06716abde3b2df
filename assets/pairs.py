"""The `pairs` asset: image URL + alt text extracted from one segment's WAT files."""

import time
from collections import Counter

import dagster as dg

from assets.metadata import counts_table
from assets.partitions import crawl_segment_partitions, partition_of
from curation import crawls as cc
from curation import io, records
from curation.layout import STAGE_TABLES
from curation.wat import ExtractConfig, extract_pairs
from resources.storage import LakeResource


@dg.asset(
    partitions_def=crawl_segment_partitions,
    kinds={"python", "parquet"},
    group_name="ingest",
    check_specs=[
        dg.AssetCheckSpec(
            "uids_unique",
            asset="pairs",
            blocking=True,
            description="Every (url, text) pair appears once in the partition.",
        )
    ],
)
def pairs(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
    """Image URL + alt-text pairs from the segment's Common Crawl WAT files, by LAION's rules with
    relative URLs resolved (LAION dropped them), language-tagged, deduplicated by (url, text) within the
    partition and against partitions already materialized. One row per pair with its provenance."""
    part = partition_of(context)
    wats = cc.wat_files(lake.crawl_root, part.crawl, part.segment)
    out_dir = lake.lake.partition_dir("pairs", part)
    earlier = io.read_int_column(
        io.finished_tables(lake.lake.stage_dir("pairs"), STAGE_TABLES["pairs"], exclude_dir=out_dir), records.UID
    )
    context.log.info(f"extracting {len(wats)} WAT files of {part.key}; {len(earlier):,} uids already in the lake")
    started = time.perf_counter()
    result = extract_pairs(wats, crawl=part.crawl, segment=part.segment, config=ExtractConfig(), exclude_uids=earlier)
    seconds = max(time.perf_counter() - started, 1e-9)
    io.clear_partition(out_dir)
    table_path = lake.lake.table("pairs", part)
    io.write_parquet(result.table, table_path)
    n = result.table.num_rows
    io.write_marker(out_dir, {"rows": n, "counts": result.counts, "wat_files": wats})
    distinct_uids = len(set(result.table.column(records.UID).to_pylist()))
    languages = Counter(result.table.column(records.LANGUAGE).to_pylist())
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": n,
            "dagster/uri": dg.MetadataValue.path(table_path),
            "wat_files": len(wats),
            "records": result.counts.get("records", 0),
            "pages": result.counts.get("pages", 0),
            "image_links": result.counts.get("image_links", 0),
            "dropped_by_reason": counts_table(
                {k: v for k, v in result.counts.items() if v and k not in _TOTALS}, "reason"
            ),
            "pairs_per_s": round(n / seconds, 1),
            "mb_per_s": round(result.bytes_read / seconds / 1e6, 2),
            "languages": counts_table({k or "(none)": v for k, v in languages.items()}, "language"),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="uids_unique",
                passed=distinct_uids == n,
                metadata={"rows": n, "distinct_uids": distinct_uids},
            )
        ],
    )


_TOTALS = ("records", "pages", "image_links", "kept")
