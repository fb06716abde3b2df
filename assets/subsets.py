"""Subset assets: one per registered definition (`curation.subsets`), each materialization a versioned release."""

from collections.abc import Sequence
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from assets.conventions import blocking_check
from assets.dedupe import dedupe
from assets.metadata import counts_table
from curation import plots
from curation.gallery import gallery_png, read_sample_image
from curation.layout import Partition
from curation.subsets import SubsetDefinition, export_subset, latest_release, read_release
from resources.storage import LakeResource

GROUP = "subsets"
GALLERY_SIZE = 8


class SubsetRunConfig(dg.Config):
    """Parameter overrides for this run (name -> value; cast to the default's type, bound by DuckDB)."""

    params: dict[str, str] = Field(default_factory=dict, description="e.g. {'min_aesthetic': '6.5'}")


def _gallery(lake_root: str, rows: pa.Table) -> str:
    sample = rows.slice(0, GALLERY_SIZE).to_pylist()
    tiles = [(read_sample_image(lake_root, Partition(r["crawl"], r["segment"]), r["source_shard"], r["source_key"])
              if r["source_shard"] and r["source_key"] else None, f"{r['aesthetic'] or 0:.1f} {r['original_width']}px")
             for r in sample]
    if not tiles:
        return "empty release"
    return plots.markdown_image(gallery_png([tiles], title="first samples (aesthetic, original width)"), "samples")


def _verify(release: dict[str, Any], table: pa.Table) -> list[str]:
    """Problems with the latest release as read back once by the asset (its parts' rows against release.json)."""
    problems = []
    if table.num_rows != release["rows"]:
        problems.append(f"parts hold {table.num_rows} rows, release.json says {release['rows']}")
    uids = table.column("uid")
    if pc.count_distinct(uids).as_py() != table.num_rows:
        problems.append("duplicate uids in the release")
    if pc.sum(pc.is_null(table.column("url"))).as_py():
        problems.append("rows without a url")
    return problems


def build_subset_asset(defn: SubsetDefinition) -> dg.AssetsDefinition:
    """The asset `subsets/<name>` for one definition."""
    key = dg.AssetKey([GROUP, defn.name])
    conditions = "; ".join(f"{n}: {e}" for n, e in defn.conditions)

    @dg.asset(
        key=key,
        deps=[dedupe],
        kinds={"duckdb", "parquet"},
        group_name=GROUP,
        description=f"{defn.description}. Conditions ({conditions}) with defaults {dict(defn.params)}"
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
        result = export_subset(lake.root, defn, config.params)
        release = latest_release(lake.root, defn.name)
        assert release is not None
        table = read_release(lake.root, defn.name, release)
        context.log.info(f"{defn.name}: release {result.release} ({'new' if result.new_release else 'unchanged'}), "
                         f"{result.rows} rows, +{result.added} -{result.removed}")
        charts = [plots.funnel_png([("candidates", result.counts["candidates"]),
                                    *[(f"{n}", c) for n, c in result.counts["passing"].items()],
                                    ("dedupe survivors", result.counts["dedupe_survivors"]),
                                    (defn.name, result.rows)], title=f"{defn.name}: what each condition passes")]
        if table.num_rows:
            charts.append(plots.histogram_png(table.column("aesthetic").to_numpy(zero_copy_only=False),
                                              title="aesthetic score in the release"))
            charts.append(plots.histogram_png(table.column("similarity").to_numpy(zero_copy_only=False),
                                              title="CLIP similarity in the release"))
        drifted = {k: v for k, v in result.drift.items() if v > defn.drift_max_ks}
        problems = _verify(release, table)
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": result.rows,
                "release": result.release,
                "new_release": result.new_release,
                "path": dg.MetadataValue.path(release["path"] if not result.new_release else result.path),
                "digest": result.digest,
                "previous_release": result.previous_release if result.previous_release is not None else -1,
                "added": result.added,
                "removed": result.removed,
                "added_by_reason": counts_table(result.added_by_reason or {"none": 0}),
                "removed_by_reason": counts_table(result.removed_by_reason or {"none": 0}),
                "params": dg.MetadataValue.json(result.params),
                "counts": dg.MetadataValue.json(result.counts),
                "parts": dg.MetadataValue.json(result.parts),
                "webdataset_shards": len(result.shards),
                "drift_ks": dg.MetadataValue.json(result.drift),
                "charts": dg.MetadataValue.md("\n\n".join(plots.markdown_image(c, "chart") for c in charts)),
                "gallery": dg.MetadataValue.md(_gallery(lake.root, table)),
                "duration_s": round(result.seconds, 2),
            },
            check_results=[
                dg.AssetCheckResult(check_name="release_consistent", passed=not problems,
                                    metadata={"problems": "\n".join(problems) or "none"}),
                dg.AssetCheckResult(check_name="score_drift", passed=not drifted,
                                    severity=dg.AssetCheckSeverity.WARN,
                                    metadata={"ks": dg.MetadataValue.json(result.drift),
                                              "threshold": defn.drift_max_ks}),
            ],
        )

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
