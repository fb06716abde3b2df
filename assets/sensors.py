"""Sensors: discover crawls and their WAT files from the listings, add partitions, request runs."""

import hashlib
import json

import dagster as dg

from assets.partitions import crawl_partitions, partition_key
from curation import crawls as cc
from curation.io import is_local
from resources.storage import LakeResource

PAIRS_KEY = dg.AssetKey("pairs")


def listing_digests(crawl_root: str, crawl: str) -> dict[str, str]:
    """Segment key -> digest of its WAT file list, so a changed listing re-triggers only that segment."""
    return {
        key: hashlib.sha1("\n".join(files).encode()).hexdigest()[:16]
        for key, files in cc.wat_files_by_segment(crawl_root, crawl).items()
    }


def build_crawl_sensor(default_running: bool) -> dg.SensorDefinition:
    @dg.sensor(
        name="crawl_sensor",
        minimum_interval_seconds=300,
        asset_selection=[PAIRS_KEY],
        default_status=dg.DefaultSensorStatus.RUNNING if default_running else dg.DefaultSensorStatus.STOPPED,
        description="Discovers crawls (and new WAT files in their listings), adds crawl partitions and "
        "requests `pairs` for new or changed segments; downstream assets follow by automation.",
    )
    def crawl_sensor(context: dg.SensorEvaluationContext, lake: LakeResource) -> dg.SensorResult:
        crawls = list(lake.crawls) or cc.discover_crawls(lake.crawl_root)
        cursor: dict[str, dict[str, str]] = json.loads(context.cursor or "{}")
        known = set(context.instance.get_dynamic_partitions(crawl_partitions.name or "cc_crawl"))
        materialized = context.instance.get_materialized_partitions(PAIRS_KEY) if known else set()
        requests: list[dg.RunRequest] = []
        for crawl in crawls:
            try:
                digests = listing_digests(lake.crawl_root, crawl)
            except cc.ListingError as exc:
                context.log.warning(str(exc))
                continue
            before = cursor.get(crawl, {})
            for seg, digest in digests.items():
                key = partition_key(crawl, seg)
                if before.get(seg) == digest or (not before and str(key) in materialized):
                    continue
                requests.append(dg.RunRequest(run_key=f"{crawl}|{seg}|{digest}", partition_key=key))
            cursor[crawl] = digests
        new = [c for c in crawls if c not in known]
        return dg.SensorResult(
            run_requests=requests,
            dynamic_partitions_requests=[crawl_partitions.build_add_request(new)] if new else [],
            cursor=json.dumps(cursor, sort_keys=True),
        )

    return crawl_sensor


def crawl_sensor_default_running(crawl_root: str) -> bool:
    """Run by default against a local mirror (the sample web); off for remote roots (egress costs)."""
    return is_local(crawl_root)
