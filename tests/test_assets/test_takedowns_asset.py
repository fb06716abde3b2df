"""The `takedowns` asset and its inbox sensor over the fixture web's deduplicated lake."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from assets.takedowns import build_takedown_sensor, build_takedowns_asset
from curation import blocklist as B
from curation import records as R
from resources.storage import LakeResource
from tests.conftest import SampleWeb


@pytest.fixture
def lake(deduped: tuple[Path, dg.ExecuteInProcessResult], tmp_path: Path) -> Path:
    out = tmp_path / "lake"
    shutil.copytree(deduped[0], out)
    return out


def _sha256s(lake: Path, n: int) -> list[str]:
    rows = [r for p in sorted(lake.glob("downloads/crawl=*/segment=*/downloads.parquet"))
            for r in pq.read_table(p).to_pylist() if r[R.STATUS] == R.STATUS_SUCCESS]
    return sorted({r[R.SHA256] for r in rows})[:n]


def test_a_list_dropped_into_the_inbox_is_sensed_ingested_and_propagated(lake: Path, sample_web: SampleWeb) -> None:
    resource = LakeResource(root=str(lake), crawl_root=str(sample_web.root))
    sensor = build_takedown_sensor()
    assert not sensor(dg.build_sensor_context(resources={"lake": resource})).run_requests  # nothing listed yet

    inbox = lake / "takedowns" / "inbox"
    inbox.mkdir(parents=True)
    hashes = _sha256s(lake, 2)
    (inbox / "hotline-42.txt").write_text("# reason: hotline report 42\n" + "".join(f"image_sha256 {h}\n"
                                                                                     for h in hashes))
    (inbox / "broken.txt").write_text("image_md5 nothex\n")
    requested = sensor(dg.build_sensor_context(resources={"lake": resource}))
    assert len(requested.run_requests) == 1

    result = dg.materialize([build_takedowns_asset()], resources={"lake": resource}, raise_on_error=False)
    assert result.success
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["takedowns_propagated"].passed
    assert not checks["inbox_lists_valid"].passed  # the broken file, named in the check's metadata
    assert "broken.txt" in str(checks["inbox_lists_valid"].metadata["refused"].value)
    refused = sorted(p.name for p in (lake / "takedowns" / "refused").iterdir())
    assert refused == ["broken.txt", "broken.txt.refused.txt"]  # the ingested list is not kept as a file
    assert not list(inbox.iterdir())

    taken = B.taken_down(str(lake))
    assert set(taken.column(B.LIST).to_pylist()) == {"hotline-42"} and taken.num_rows >= len(hashes)
    (record,) = B.list_records(str(lake))
    assert record.reason == "hotline report 42"
    metadata = result.asset_materializations_for_node("takedowns")[0].metadata
    assert metadata["dagster/row_count"].value == taken.num_rows
    assert metadata["shard_members_removed"].value == 3 * taken.num_rows  # .jpg, .txt, .json of each image

    cursor = requested.cursor
    again = sensor(dg.build_sensor_context(cursor=cursor, resources={"lake": resource}))
    assert not again.run_requests  # the inbox is empty and nothing else changed
