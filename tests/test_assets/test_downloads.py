"""The pairs -> downloads assets on the served sample web, measured against its ground truth."""

from __future__ import annotations

import tarfile
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from assets.downloads import downloads
from assets.pairs import pairs
from curation import records
from curation.sample.server import SampleWebServer
from curation.sample.web import HTTP_BEHAVIOURS
from resources.downloader import DownloaderResource
from resources.storage import LakeResource
from tests.conftest import SampleWeb

# Truth's expected failure reason -> the downloader's reason code (corrupt bytes are "not an image").
REASONS = {"corrupt": "not_an_image"}


def _materialize(
    sample_web: SampleWeb, lake_root: Path, allow_loopback: bool, instance: dg.DagsterInstance, segment: str = "000"
) -> dg.ExecuteInProcessResult:
    resources = {
        "lake": LakeResource(root=str(lake_root), crawl_root=str(sample_web.root)),
        "downloader": DownloaderResource(allow_loopback=allow_loopback, processes=1, threads=16),
    }
    return dg.materialize(
        [pairs, downloads],
        partition_key=f"{sample_web.config.crawl}|{segment}",
        resources=resources,
        instance=instance,
        raise_on_error=False,
    )


@pytest.fixture(scope="module")
def instance() -> dg.DagsterInstance:
    inst = dg.DagsterInstance.ephemeral()
    return inst


@pytest.fixture(scope="module")
def downloaded(
    sample_web: SampleWeb,
    sample_server: SampleWebServer,
    tmp_path_factory: pytest.TempPathFactory,
    instance: dg.DagsterInstance,
) -> tuple[Path, dg.ExecuteInProcessResult]:
    instance.add_dynamic_partitions("cc_crawl", [sample_web.config.crawl])
    lake = tmp_path_factory.mktemp("lake")
    first = _materialize(sample_web, lake, True, instance, segment="000")
    assert _materialize(sample_web, lake, True, instance, segment="001").success
    return lake, first


def _joined(lake: Path) -> list[dict[str, object]]:
    p = pa.concat_tables(pq.read_table(f).select(["uid", "url"]) for f in sorted(lake.glob("pairs/*/*/pairs.parquet")))
    d = pa.concat_tables(pq.read_table(f) for f in sorted(lake.glob("downloads/*/*/downloads.parquet")))
    urls = dict(zip(p.column("uid").to_pylist(), p.column("url").to_pylist(), strict=True))
    return [{**row, "url": urls[row["uid"]]} for row in d.to_pylist()]


def test_every_planted_behaviour_ends_with_the_expected_status(
    sample_web: SampleWeb, downloaded: tuple[Path, dg.ExecuteInProcessResult]
) -> None:
    lake, result = downloaded
    assert result.success
    truth = {str(r["url"]): r for r in sample_web.truth()}
    rows = _joined(lake)
    assert len(rows) == sum(pq.read_metadata(f).num_rows for f in lake.glob("pairs/*/*/pairs.parquet"))
    seen_behaviours = set()
    for row in rows:
        t = truth[str(row["url"])]
        seen_behaviours.add(t["http_behavior"])
        if t["expect_status"] == "success":
            assert row["status"] == records.STATUS_SUCCESS, (t["http_behavior"], row["error"])
            assert (row["original_width"], row["original_height"]) == (t["width"], t["height"])
            assert row["sha256"] == t["sha256"]
            assert min(int(row["width"]), int(row["height"])) <= 256  # type: ignore[call-overload]  # keep_ratio: short side
        else:
            assert row["status"] != records.STATUS_SUCCESS, t["http_behavior"]
            assert row["reason"] == REASONS.get(str(t["expect_reason"]), t["expect_reason"]), (t, row["error"])
        if t["http_behavior"] == "redirect":
            assert row["http_status"] == 200 and "/_hop/1/" in str(row["final_url"])
        if t["http_behavior"] in ("not_found", "server_error"):
            assert row["http_status"] == {"not_found": 404, "server_error": 500}[str(t["http_behavior"])]
        if t["http_behavior"] == "x_robots_noai":
            assert row["status"] == records.STATUS_BLOCKED
    assert seen_behaviours == set(HTTP_BEHAVIOURS)  # every planted behaviour was exercised


def test_checks_pass_and_metadata_reports_rates(downloaded: tuple[Path, dg.ExecuteInProcessResult]) -> None:
    _, result = downloaded
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"uids_unique": True, "success_rate_in_band": True, "shards_match_table": True}
    mat = next(
        m for m in result.get_asset_materialization_events() if m.asset_key == dg.AssetKey("downloads")
    ).step_materialization_data.materialization
    assert 0.8 < float(mat.metadata["success_rate"].value) < 1.0  # type: ignore[arg-type]
    assert "http_404" in str(mat.metadata["by_reason"].value)


def test_rerun_replaces_the_partition_exactly(
    sample_web: SampleWeb, downloaded: tuple[Path, dg.ExecuteInProcessResult], instance: dg.DagsterInstance
) -> None:
    lake, _ = downloaded
    table = next(lake.glob("downloads/crawl=*/segment=000/downloads.parquet"))
    before = pq.read_table(table)
    contents_before = _tar_contents(table.parent)
    assert _materialize(sample_web, lake, True, instance).success
    after = pq.read_table(table)
    assert before.equals(after)
    # Same samples with the same bytes (threads finish in any order, so member order may differ).
    assert _tar_contents(table.parent) == contents_before
    assert not list(table.parent.glob(".staging-*")) and not list(table.parent.glob(".tmp-*"))


def _tar_contents(partition_dir: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for path in sorted(partition_dir.glob("shards/*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                f = tar.extractfile(member)
                assert f is not None
                out[f"{path.name}/{member.name}"] = f.read()
    assert out
    return out


def test_without_loopback_allowed_nothing_reaches_the_sample_web(
    sample_web: SampleWeb, sample_server: SampleWebServer, tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    before = sample_server.total_hits
    result = _materialize(sample_web, tmp_path / "lake", False, instance, segment="001")
    assert result.success
    rows = pq.read_table(next((tmp_path / "lake").glob("downloads/crawl=*/segment=001/downloads.parquet"))).to_pylist()
    assert rows and all(r["status"] == records.STATUS_BLOCKED and r["reason"] == "ssrf_blocked" for r in rows)
    assert sample_server.total_hits == before  # not one connection, redirects included
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["success_rate_in_band"] is False and checks["shards_match_table"] is True


def test_cli_extracts_and_downloads_outside_dagster(
    sample_web: SampleWeb, sample_server: SampleWebServer, tmp_path: Path
) -> None:
    from curation import crawls as cc
    from curation.cli import main

    wats = cc.wat_files(str(sample_web.root), sample_web.config.crawl, "001")
    out = tmp_path / "pairs.parquet"
    assert main(["extract", *wats, "-o", str(out), "--crawl", sample_web.config.crawl, "--segment", "001"]) == 0
    n = pq.read_metadata(out).num_rows
    assert n > 100
    assert main(["download", str(out), str(tmp_path / "dl"), "--processes", "1", "--allow-loopback"]) == 0
    table = pq.read_table(tmp_path / "dl" / "downloads.parquet")
    assert table.num_rows == n and table.column("status").to_pylist().count("success") > 0.8 * n
    assert list((tmp_path / "dl" / "shards").glob("*.tar"))
