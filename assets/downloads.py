"""The `downloads` asset: one segment's images fetched and resized into webdataset shards."""

from pathlib import Path
from typing import Any

import dagster as dg
from dagster_slurm import ComputeResource

from assets.conventions import EAGER, blocking_check
from assets.metadata import dispatched_result, stage_result
from assets.partitions import crawl_segment_partitions, partition_of
from curation.stages import SUCCESS_RATE_BAND, materialize_downloads
from resources.downloader import DownloaderResource
from resources.storage import LakeResource

PAYLOAD = str(Path(__file__).parent / "payloads" / "cpu_stage.py")
SPEC: dict[str, Any] = {
    "name": "downloads",
    "partitions_def": crawl_segment_partitions,
    "deps": [dg.AssetKey("pairs")],
    "group_name": "ingest",
    "automation_condition": EAGER,
    "description": "The segment's images downloaded with img2dataset into webdataset shards (256 px, keep_ratio "
    "by default) behind an SSRF guard, with LAION's size and pixel limits and X-Robots-Tag opt-outs, plus a "
    "per-pair table: status, reason, HTTP status, final URL, original and resized sizes, sha256, shard, key.",
    "check_specs": [
        dg.AssetCheckSpec("success_rate_in_band", asset="downloads",
                          description=f"Download success rate within {SUCCESS_RATE_BAND} (WARN otherwise)."),
        blocking_check("downloads", "shards_match_table", "Every success row is in its shard's tar with "
                       "jpg/txt/json, and the tars hold nothing else."),
    ],
}


def build_downloads(on_compute: bool = False) -> dg.AssetsDefinition:
    """The `downloads` asset, in the Dagster process or (`on_compute`) as a job on the compute resource, both
    running `curation.stages.materialize_downloads` with the downloader resource's options."""
    if on_compute:

        @dg.asset(**SPEC, kinds={"python", "webdataset", "slurm"})
        def downloads_job(context: dg.AssetExecutionContext, lake: LakeResource, downloader: DownloaderResource,
                          compute: ComputeResource) -> dg.MaterializeResult:
            part = partition_of(context)
            invocation = compute.run(context=context, payload_path=PAYLOAD, extras={
                "stage": "downloads", "lake_root": lake.root, "crawl": part.crawl, "segment": part.segment,
                "download_options": downloader.options()})
            return dispatched_result(invocation, "downloads")

        return downloads_job

    @dg.asset(**SPEC, kinds={"python", "webdataset"})
    def downloads_here(context: dg.AssetExecutionContext, lake: LakeResource,
                       downloader: DownloaderResource) -> dg.MaterializeResult:
        return stage_result(context, materialize_downloads(lake.root, partition_of(context), downloader.options()))

    return downloads_here


downloads = build_downloads()
