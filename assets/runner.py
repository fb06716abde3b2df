"""`curation run`: materialize every asset for every partition of a crawl in process.

It uses the same Definitions the UI shows (`assets.wiring.build_definitions`), wired to its flags on top
of the environment's settings, so runs recorded in a persistent DAGSTER_HOME appear in `make ui`. The
`run` subcommand of the `curation` CLI is registered by `assets.run_command` (the `curation.commands`
entry point), which imports this module only when `run` executes, keeping `curation/` free of Dagster.
"""

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from assets.conventions import POOL_YAML
from assets.partitions import crawl_partitions, crawl_segment_partitions, partition_key
from assets.run_command import add_run_command as add_run_command  # its home before it moved
from assets.wiring import build_definitions
from curation import crawls as cc
from resources.settings import Settings

DAGSTER_YAML = "telemetry:\n  enabled: false\n" + POOL_YAML
# Keep the console for the progress display: step events go to the instance (and the UI), not stdout.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


@dataclass
class AssetSummary:
    partitions_ok: int = 0
    partitions_failed: int = 0
    rows: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)


def open_instance(dagster_home: str | None) -> dg.DagsterInstance:
    """A persistent instance in `dagster_home` (created with telemetry off), else an ephemeral one."""
    if dagster_home is None:
        return dg.DagsterInstance.ephemeral()
    home = Path(dagster_home).absolute()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    return dg.DagsterInstance.get()


def run_crawls(
    settings: Settings, instance: dg.DagsterInstance, crawls: list[str], console: Console
) -> dict[str, AssetSummary]:
    """Materialize every partitioned asset per (crawl, segment), then every unpartitioned asset."""
    defs = build_definitions(settings)
    job = defs.resolve_implicit_global_asset_job_def()
    graph = defs.resolve_asset_graph()
    keys = [k for k in graph.toposorted_asset_keys if graph.get(k).is_materializable]
    partitioned = [k for k in keys if graph.get(k).partitions_def == crawl_segment_partitions]
    global_keys = [k for k in keys if graph.get(k).partitions_def is None]
    known = set(instance.get_dynamic_partitions(crawl_partitions.name or "cc_crawl"))
    new = [c for c in crawls if c not in known]
    if new:
        instance.add_dynamic_partitions(crawl_partitions.name or "cc_crawl", new)
    plan = [(c, s) for c in crawls for s in cc.segment_keys(settings.crawl_root, c)]
    summary = {k.to_user_string(): AssetSummary() for k in keys}
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("partitions", total=len(plan) + (1 if global_keys else 0))
        for crawl, seg in plan:
            progress.update(task, description=f"{crawl}|{seg}")
            result = job.execute_in_process(
                run_config=QUIET,
                instance=instance,
                partition_key=str(partition_key(crawl, seg)),
                asset_selection=partitioned,
                raise_on_error=False,
            )
            _collect(result, summary, f"{crawl}|{seg}")
            progress.advance(task)
        if global_keys:
            progress.update(task, description="global assets")
            result = job.execute_in_process(
                run_config=QUIET, instance=instance, asset_selection=global_keys, raise_on_error=False
            )
            _collect(result, summary, "global")
            progress.advance(task)
    return summary


def _asset_name(step_key: str) -> str:
    """The asset a step materializes, spelt as in the summary (`subsets__laion_aesthetic` -> `subsets/...`)."""
    return step_key.split(".")[-1].replace("__", "/")


def _collect(result: dg.ExecuteInProcessResult, summary: dict[str, AssetSummary], label: str) -> None:
    for event in result.get_asset_materialization_events():
        mat = event.step_materialization_data.materialization
        entry = summary.setdefault(mat.asset_key.to_user_string(), AssetSummary())
        entry.partitions_ok += 1
        rows = mat.metadata.get("dagster/row_count")
        entry.rows += int(rows.value) if rows is not None else 0
    for event in result.all_events:
        if event.is_step_success and event.step_key:
            millis = getattr(event.event_specific_data, "duration_ms", 0.0) or 0.0
            summary.setdefault(_asset_name(event.step_key), AssetSummary()).seconds += millis / 1000
        if event.is_step_failure and event.step_key:
            name = _asset_name(event.step_key)
            entry = summary.setdefault(name, AssetSummary())
            entry.partitions_failed += 1
            error = event.step_failure_data.error if event.step_failure_data else None
            entry.failures.append(f"{label}: {error.message.strip().splitlines()[0] if error else 'failed'}")


def print_summary(summary: dict[str, AssetSummary], console: Console) -> None:
    table = Table(title="curation run")
    for col in ("asset", "partitions ok", "failed", "rows", "seconds"):
        table.add_column(col, justify="left" if col == "asset" else "right")
    for name, s in summary.items():
        table.add_row(name, str(s.partitions_ok), str(s.partitions_failed), f"{s.rows:,}", f"{s.seconds:.1f}")
    console.print(table)
    for name, s in summary.items():
        for failure in s.failures:
            console.print(f"[red]{name} {failure}[/red]")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The environment's settings (compute, GPUs, subsets registry, cron, …) with the command line's on top
    (the variables the flags replace are not read)."""
    return Settings.from_env(
        lake_root=str(args.lake),
        crawl_root=str(args.crawl_root),
        allow_loopback=bool(args.allow_loopback),
        clip_spec=args.clip_spec or None,
        clip_device=args.clip_device,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """`curation run`: check the settings, then materialize every crawl and print the summary. A bad setting
    raises ValueError naming the variable or flag to fix (the CLI prints it as one line, exit status 2)."""
    console = Console()
    settings = settings_from_args(args)
    settings.check()
    crawls = args.crawl or cc.discover_crawls(settings.crawl_root)
    if not crawls:
        console.print(f"[red]no crawl listing found under {settings.crawl_root}/crawl-data/; pass --crawl ID[/red]")
        return 2
    instance = open_instance(args.dagster_home)
    summary = run_crawls(settings, instance, crawls, console)
    print_summary(summary, console)
    return 1 if any(s.partitions_failed for s in summary.values()) else 0
