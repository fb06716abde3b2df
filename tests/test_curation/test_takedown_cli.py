"""`curation takedown add|propagate|report` on a small hand-written lake: matching by kind, refusals as one line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation import blocklist as B
from curation import records as R
from curation.cli import main
from curation.subsets import BUILTIN_SUBSETS, export_subset, latest_release
from tests.test_curation.test_subsets import ROWS, write_lake


def _stage(lake: Path, stage: str) -> dict[int, dict[str, object]]:
    (path,) = lake.glob(f"{stage}/crawl=*/segment=*/{stage}.parquet")
    return {r["uid"]: r for r in pq.read_table(path).to_pylist()}


def test_add_matches_by_kind_and_propagates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lake = tmp_path / "lake"
    write_lake(lake, ROWS)
    high_res = {d.name: d for d in BUILTIN_SUBSETS}["laion_high_res"]
    first = export_subset(str(lake), high_res)
    listing = tmp_path / "report.csv"
    listing.write_text("kind,value\n"
                       f"image_sha256,{2:064x}\n"  # write_lake's sha256 of uid 2
                       "uid,4\n"
                       "url,http://example.com/99.jpg\n")  # in no row of the lake
    assert main(["takedown", "add", str(lake), str(listing), "--list", "ncmec-2026-12", "--reason", "report"]) == 0
    out = capsys.readouterr().out
    assert "3 entries" in out and "2 rows matched" in out
    taken = B.taken_down(str(lake))
    assert dict(zip(taken.column(R.UID).to_pylist(), taken.column(B.KIND).to_pylist(), strict=True)) == {
        2: "image_sha256", 4: "uid"}
    pairs, downloads = _stage(lake, "pairs"), _stage(lake, "downloads")
    assert pairs[2][R.URL] is None and pairs[2][R.TEXT] is None and pairs[1][R.URL] == "http://example.com/1.jpg"
    assert (downloads[4][R.STATUS], downloads[4][R.REASON]) == (R.STATUS_TAKEN_DOWN, "takedown:ncmec-2026-12")
    assert downloads[4][R.SHA256] is None and downloads[1][R.STATUS] == R.STATUS_SUCCESS
    release = latest_release(str(lake), high_res.name)
    assert release is not None and release["release"] == first.release + 1
    assert release["diff"]["removed_by_reason"] == {"takedown:ncmec-2026-12": 2}  # uids 2 and 4 were high-res

    assert main(["takedown", "report", str(lake), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (entry,) = report["lists"]
    assert (entry["rows"], entry["rows_by_kind"], entry["propagated"]) == (2, {"image_sha256": 1, "uid": 1}, True)


def test_refusals_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lake = tmp_path / "lake"
    write_lake(lake, ROWS)
    bad = tmp_path / "bad.txt"
    bad.write_text("image_md5 123\nhost ok.example\n")
    assert main(["takedown", "add", str(lake), str(bad), "--list", "x", "--reason", "r"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("curation takedown add: bad.txt: 1 invalid entry, nothing ingested")
    good = tmp_path / "good.txt"
    good.write_text("host ok.example\n")
    assert main(["takedown", "add", str(lake), str(good), "--list", "x"]) == 2  # no reason given
    assert "give a reason" in capsys.readouterr().err
    assert main(["takedown", "add", str(lake), str(good), "--list", "a/b", "--reason", "r"]) == 2
    assert B.list_records(str(lake)) == []  # nothing was stored by any refused call
