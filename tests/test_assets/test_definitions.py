"""Dagster wiring: definitions load, the partition scheme, the crawl sensor and the headless runner."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from assets.definitions import build_definitions, defs
from assets.partitions import SEGMENTS_PER_CRAWL, crawl_segment_partitions
from assets.runner import add_run_command, open_instance, run_crawls, settings_from_args
from assets.sensors import build_crawl_sensor
from curation.cli import main as cli_main
from curation.sample.server import SampleWebServer
from resources.compute import LocalComputeResource
from resources.settings import Settings
from resources.storage import LakeResource
from tests.conftest import SampleWeb


def test_definitions_load_and_validate() -> None:
    dg.Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for k in defs.resolve_all_asset_keys()}
    assert {"pairs", "downloads", "clip", "dedupe", "index", "subsets/laion_aesthetic",
            "subsets/laion_high_res"} <= keys
    assert isinstance(defs.resources["compute"], LocalComputeResource)
    schedule = defs.resolve_schedule_def("subset_refresh")
    assert schedule.cron_schedule == "0 4 * * *" and schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    graph = defs.resolve_asset_graph()
    assert graph.get(dg.AssetKey("index")).automation_condition is not None
    job = defs.resolve_job_def("refresh_subsets")
    assert {k.to_user_string() for k in job.asset_layer.selected_asset_keys} == {
        "subsets/laion_aesthetic", "subsets/laion_high_res"}


def test_workspace_yaml_points_at_the_definitions() -> None:
    text = (Path(__file__).resolve().parents[2] / "workspace.yaml").read_text()
    assert "module_name: assets.definitions" in text


def test_partition_scheme_is_crawl_by_segment_index() -> None:
    dims = {d.name: d.partitions_def for d in crawl_segment_partitions.partitions_defs}
    assert isinstance(dims["crawl"], dg.DynamicPartitionsDefinition) and dims["crawl"].name == "cc_crawl"
    assert dims["segment"].get_partition_keys()[:2] == ["000", "001"]
    assert len(dims["segment"].get_partition_keys()) == SEGMENTS_PER_CRAWL


def test_local_compute_needs_no_pixi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIXI_ENVIRONMENT_NAME", raising=False)
    monkeypatch.delenv("PIXI_PROJECT_ROOT", raising=False)
    compute = defs.resources["compute"]
    client = compute.get_pipes_client(dg.build_init_resource_context())
    assert type(client).__name__ == "LocalPipesClient" and client.require_pixi is False


def test_crawl_sensor_adds_the_crawl_and_requests_each_segment(sample_web: SampleWeb, tmp_path: Path) -> None:
    lake = LakeResource(root=str(tmp_path / "lake"), crawl_root=str(sample_web.root))
    sensor = build_crawl_sensor(default_running=True)
    with dg.instance_for_test() as instance:
        ctx = dg.build_sensor_context(instance=instance, resources={"lake": lake})
        result = sensor(ctx)
        assert [r.partition_keys for r in result.dynamic_partitions_requests] == [[sample_web.config.crawl]]
        assert sorted(str(r.partition_key) for r in result.run_requests) == [
            f"{sample_web.config.crawl}|000",
            f"{sample_web.config.crawl}|001",
        ]
        # Same listing again: nothing new to do.
        again = sensor(dg.build_sensor_context(instance=instance, resources={"lake": lake}, cursor=result.cursor))
        assert again.run_requests == []
        # A changed listing re-requests only the segment whose WAT files changed.
        cursor = json.loads(result.cursor or "{}")
        cursor[sample_web.config.crawl]["001"] = "stale"
        third = sensor(dg.build_sensor_context(instance=instance, resources={"lake": lake}, cursor=json.dumps(cursor)))
        assert [str(r.partition_key) for r in third.run_requests] == [f"{sample_web.config.crawl}|001"]


def test_runner_materializes_every_partition_and_sql_sees_it(
    sample_web: SampleWeb,
    sample_server: SampleWebServer,
    sample_models: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    lake = tmp_path / "lake"
    spec = tmp_path / "models.json"
    spec.write_text(json.dumps(sample_models))
    settings = Settings(lake_root=str(lake), crawl_root=str(sample_web.root), allow_loopback=True,
                        clip_spec=str(spec), clip_device="cpu")
    instance = open_instance(None)
    summary = run_crawls(settings, instance, [sample_web.config.crawl], Console(file=None, quiet=True))
    for asset in ("pairs", "downloads", "clip"):
        assert summary[asset].partitions_ok == 2 and summary[asset].partitions_failed == 0, summary[asset]
    assert summary["clip"].rows == summary["pairs"].rows
    for asset in ("dedupe", "index", "subsets/laion_aesthetic", "subsets/laion_high_res"):
        assert summary[asset].partitions_ok == 1 and summary[asset].partitions_failed == 0, (asset, summary[asset])
    expected = sum(1 for r in sample_web.truth() if r["extract"])
    assert summary["pairs"].rows == expected
    assert instance.get_dynamic_partitions("cc_crawl") == [sample_web.config.crawl]
    tables = sorted(lake.glob("pairs/crawl=*/segment=*/pairs.parquet"))
    assert len(tables) == 2 and sum(pq.read_metadata(t).num_rows for t in tables) == expected
    # The same Definitions as the UI: the runs and materializations are in the instance (one run per
    # partition, then one for the global assets).
    assert len(instance.get_runs()) == 3
    assert (
        cli_main(
            ["sql", str(lake), "SELECT count(*) AS n, count(DISTINCT segment) AS s FROM pairs", "--format", "json"]
        )
        == 0
    )
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row == {"n": expected, "s": 2}


def test_build_definitions_uses_the_given_settings(tmp_path: Path) -> None:
    d = build_definitions(Settings(lake_root=str(tmp_path), crawl_root="s3://commoncrawl"))
    lake = d.resources["lake"]
    assert lake.root == str(tmp_path) and lake.crawl_root == "s3://commoncrawl"
    # Remote crawl roots keep the sensor off by default (egress), local mirrors turn it on.
    assert d.resolve_sensor_def("crawl_sensor").default_status == dg.DefaultSensorStatus.STOPPED


def test_run_command_keeps_the_environment_settings_the_flags_do_not_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`curation run` takes the lake, crawl root, loopback and CLIP flags from its command line and everything
    else (subsets registry, schedule, GPUs, where CPU stages run) from the environment, as the UI does."""
    registry = tmp_path / "subsets.yaml"
    monkeypatch.setenv("CURATION_SUBSETS", str(registry))
    monkeypatch.setenv("CURATION_SUBSET_CRON", "30 2 * * *")
    monkeypatch.setenv("CURATION_INDEX_GPUS", "2")
    monkeypatch.setenv("CURATION_CPU_STAGES", "compute")
    monkeypatch.setenv("CURATION_ALLOW_LOOPBACK", "1")  # only the flag turns loopback on
    parser = argparse.ArgumentParser()
    add_run_command(parser.add_subparsers())
    args = parser.parse_args(["run", "--crawl-root", str(tmp_path / "web"), "--lake", str(tmp_path / "lake")])
    settings = settings_from_args(args)
    assert (settings.lake_root, settings.crawl_root) == (str(tmp_path / "lake"), str(tmp_path / "web"))
    assert settings.subsets_registry == str(registry) and settings.subset_cron == "30 2 * * *"
    assert (settings.index_gpus, settings.clip_gpus, settings.cpu_stages) == (2, 0, "compute")
    assert settings.allow_loopback is False


def test_pairs_rerun_replaces_the_partition_exactly(sample_web: SampleWeb, tmp_path: Path) -> None:
    from assets.pairs import pairs

    lake = LakeResource(root=str(tmp_path / "lake"), crawl_root=str(sample_web.root))
    key = f"{sample_web.config.crawl}|001"
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("cc_crawl", [sample_web.config.crawl])
        tables = []
        for _ in range(2):
            result = dg.materialize([pairs], partition_key=key, resources={"lake": lake}, instance=instance)
            assert result.success
            path = next((tmp_path / "lake" / "pairs").glob("crawl=*/segment=001/pairs.parquet"))
            tables.append(pq.read_table(path))
        assert tables[0].equals(tables[1]) and tables[0].num_rows > 0
        files = sorted(p.name for p in path.parent.iterdir())
        assert files == ["_SUCCESS.json", "pairs.parquet"]  # no temporary files left behind
