"""Subset assets: one per registered definition (`curation.subsets`), each materialization a versioned release.

Every subset is re-exported by the `subset_refresh` schedule. A saved search (a subset defined by a query,
`curation subset save` / `POST /subsets`) also depends on the `index` asset and materializes eagerly after it, through
the automation sensor: a new index generation is what changes its matches. A search saved while Dagster runs becomes
an asset when the code location is reloaded (definitions are built from the registry at load).
"""

from collections.abc import Sequence

import dagster as dg
from pydantic import Field

from assets.conventions import EAGER, LAKE_WRITER_POOL, blocking_check
from assets.dedupe import dedupe
from assets.metadata import stage_result
from curation.stages import materialize_subset
from curation.subsets import SubsetDefinition
from resources.storage import LakeResource

GROUP = "subsets"
INDEX_KEY = dg.AssetKey("index")


class SubsetRunConfig(dg.Config):
    """Parameter overrides for this run (name -> value; cast to the default's type, bound by DuckDB)."""

    params: dict[str, str] = Field(default_factory=dict, description="e.g. {'min_aesthetic': '6.5'}")


def build_subset_asset(defn: SubsetDefinition) -> dg.AssetsDefinition:
    """The asset `subsets/<name>` for one definition."""
    key = dg.AssetKey([GROUP, defn.name])
    conditions = "; ".join(f"{n}: {e}" for n, e in defn.conditions)
    searched = defn.query is not None
    rule = (f"A saved search, re-evaluated exactly over each new index generation ({defn.query.describe()})"
            if defn.query is not None else f"Conditions ({conditions}) with defaults {dict(defn.params)}")

    @dg.asset(
        key=key,
        deps=[dedupe, INDEX_KEY] if searched else [dedupe],
        kinds={"duckdb", "parquet"},
        group_name=GROUP,
        automation_condition=EAGER if searched else None,
        pool=LAKE_WRITER_POOL,
        description=f"{defn.description}. {rule}"
        + ("; dedupe survivors only" if defn.survivors_only else "")
        + f". Exported as {defn.parts} img2dataset-compatible parquet part(s)"
        + (" and webdataset shards copied from the downloads" if defn.webdataset else "")
        + "; each change is a new release with a diff against the previous one.",
        check_specs=[
            blocking_check(key, "release_consistent", "The latest release's parts hold release.json's row "
                           "count, with unique uids and a url on every row."),
            dg.AssetCheckSpec("score_drift", asset=key,
                              description=f"Warns when a score distribution (aesthetic, similarity, punsafe, "
                              f"pwatermark) moved by a KS statistic above {defn.drift_max_ks} since the "
                              f"previous release."),
        ],
    )
    def _subset(context: dg.AssetExecutionContext, config: SubsetRunConfig, lake: LakeResource
                ) -> dg.MaterializeResult:
        return stage_result(context, materialize_subset(lake.root, defn, config.params))

    return _subset


def build_subset_assets(definitions: Sequence[SubsetDefinition]) -> list[dg.AssetsDefinition]:
    return [build_subset_asset(d) for d in definitions]


def build_subset_schedule(cron: str) -> dg.ScheduleDefinition:
    """Re-export every subset on a cron schedule (new partitions and re-scores reach the releases)."""
    job = dg.define_asset_job("refresh_subsets", selection=dg.AssetSelection.groups(GROUP),
                              description="Re-evaluate every subset and publish a release where rows changed.")
    return dg.ScheduleDefinition(name="subset_refresh", job=job, cron_schedule=cron,
                                 default_status=dg.DefaultScheduleStatus.RUNNING,
                                 description="Refresh the subsets' releases from the current lake.")
