"""The `pairs` asset: image URL + alt text extracted from one segment's WAT files."""

from pathlib import Path
from typing import Any

import dagster as dg
from dagster_slurm import ComputeResource

from assets.conventions import blocking_check
from assets.metadata import dispatched_result, stage_result
from assets.partitions import crawl_segment_partitions, partition_of
from curation.stages import materialize_pairs
from resources.storage import LakeResource

PAYLOAD = str(Path(__file__).parent / "payloads" / "cpu_stage.py")
SPEC: dict[str, Any] = {
    "name": "pairs",
    "partitions_def": crawl_segment_partitions,
    "group_name": "ingest",
    "description": "Image URL + alt-text pairs from the segment's Common Crawl WAT files, by LAION's rules with "
    "relative URLs resolved (LAION dropped them), language-tagged, deduplicated by (url, text) within the "
    "partition and against partitions already materialized. One row per pair with its provenance.",
    "check_specs": [
        blocking_check("pairs", "uids_unique", "Every (url, text) pair appears once in the partition."),
    ],
}


def build_pairs(on_compute: bool = False) -> dg.AssetsDefinition:
    """The `pairs` asset, extracting in the Dagster process, or (`on_compute`) as a job on the compute resource
    (a SLURM job under the slurm deployment) running the same `curation.stages.materialize_pairs`."""
    if on_compute:

        @dg.asset(**SPEC, kinds={"python", "parquet", "slurm"})
        def pairs_job(context: dg.AssetExecutionContext, lake: LakeResource,
                      compute: ComputeResource) -> dg.MaterializeResult:
            part = partition_of(context)
            invocation = compute.run(context=context, payload_path=PAYLOAD, extras={
                "stage": "pairs", "lake_root": lake.root, "crawl_root": lake.crawl_root,
                "crawl": part.crawl, "segment": part.segment})
            return dispatched_result(invocation, "pairs")

        return pairs_job

    @dg.asset(**SPEC, kinds={"python", "parquet"})
    def pairs_here(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
        return stage_result(context, materialize_pairs(lake.root, lake.crawl_root, partition_of(context)))

    return pairs_here


pairs = build_pairs()
