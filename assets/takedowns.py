"""The `takedowns` asset and the sensor that runs it when a list lands in the lake's takedown inbox."""

import hashlib
import json

import dagster as dg

from assets.conventions import LAKE_WRITER_POOL, blocking_check
from assets.metadata import stage_result
from curation import io
from curation.blocklist import inbox_dir, list_records
from curation.layout import Lake
from curation.stages import materialize_takedowns
from resources.storage import LakeResource

TAKEDOWNS_KEY = dg.AssetKey("takedowns")


def build_takedowns_asset(registry: str | None = None) -> dg.AssetsDefinition:
    """The `takedowns` asset; `registry` (CURATION_SUBSETS) names the subsets whose releases it updates besides
    the built-ins and saved searches."""

    @dg.asset(
        key=TAKEDOWNS_KEY,
        kinds={"python", "parquet"},
        group_name="takedowns",
        pool=LAKE_WRITER_POOL,
        check_specs=[
            blocking_check(TAKEDOWNS_KEY, "takedowns_propagated",
                           "No taken-down sample remains: stage rows emptied, images out of the shards, embeddings "
                           "zeroed, out of dedupe, the index and every subset release."),
            dg.AssetCheckSpec("inbox_lists_valid", asset=TAKEDOWNS_KEY,
                              description="Every file dropped into the inbox was a valid list (a refused one is "
                                          "moved to takedowns/refused/ with a .refused.txt saying why)."),
        ],
    )
    def takedowns(context: dg.AssetExecutionContext, lake: LakeResource) -> dg.MaterializeResult:
        """The lake's append-only takedown blocklist and its propagation. Lists dropped into
        `<lake>/takedowns/inbox/` (or added with `curation takedown add`) are ingested once and matched against the
        whole lake without fetching anything (URL, URL sha256, image sha256/md5, pHash within a radius, host,
        uid, caption keyword/regex with a punsafe floor); the search service stops returning a hit at once. Then
        every hit leaves the lake: its rows keep only uid, status `taken_down` and the list, its image bytes are
        rewritten out of the downloads shards and subset re-shards, its embeddings zeroed; dedupe and the index
        are brought up to date and every subset that held one gets a new release whose diff says
        `takedown:<list>`. Later crawls never fetch a blocked URL or host, and drop an image matching a blocked
        hash before writing it."""
        return stage_result(context, materialize_takedowns(lake.root, registry))

    return takedowns


def _inbox_files(lake_root: str) -> list[tuple[str, int]]:
    fs, inbox = io.filesystem(inbox_dir(lake_root))
    if not fs.exists(inbox):
        return []
    return sorted((str(p), int(fs.size(p))) for p in fs.ls(inbox, detail=False)
                  if not str(p).rstrip("/").rsplit("/", 1)[-1].startswith("."))


def _scored_partitions(lake_root: str) -> str:
    parts = [p.key for p in io.finished_partitions(Lake(lake_root).stage_dir("clip"))]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def build_takedown_sensor() -> dg.SensorDefinition:
    @dg.sensor(
        name="takedown_inbox_sensor",
        minimum_interval_seconds=30,
        asset_selection=[TAKEDOWNS_KEY],
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Runs `takedowns` when a list lands in <lake>/takedowns/inbox/, and when new partitions were "
                    "scored while lists exist (caption rules with a punsafe floor need the scores).",
    )
    def takedown_inbox_sensor(context: dg.SensorEvaluationContext, lake: LakeResource) -> dg.SensorResult:
        files = _inbox_files(lake.root)
        parts = _scored_partitions(lake.root)
        before = json.loads(context.cursor) if context.cursor else {}
        cursor = json.dumps({"parts": parts})
        new_partitions = before.get("parts") not in (None, parts) and bool(list_records(lake.root))
        if not files and not new_partitions:
            return dg.SensorResult(cursor=cursor)
        key = hashlib.sha256(json.dumps([files, parts]).encode()).hexdigest()[:24]
        return dg.SensorResult(run_requests=[dg.RunRequest(run_key=f"takedowns-{key}")], cursor=cursor)

    return takedown_inbox_sensor
