"""Readers of the lake's stage tables: only finished partitions are visible, whatever the lake's path holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from curation import io
from curation.cli import main
from curation.layout import STAGE_TABLES, SUCCESS_MARKER, Lake, Partition
from curation.sql import connect
from curation.subsets import sandboxed_candidates
from tests.test_curation.test_subsets import CRAWL, ROWS, write_lake

# Segment 001 holds other uids, so a row read from it can never pass for one of segment 000.
ROWS_001 = [(uid + 100, *rest) for uid, *rest in ROWS]
KEPT = sum(1 for r in ROWS if r[6])


def two_partitions(root: Path) -> Lake:
    """A lake with every stage finished for segments 000 and 001 (markers written by `write_lake`)."""
    write_lake(root, ROWS, segment="000")
    write_lake(root, ROWS_001, segment="001")
    return Lake(str(root))


def unfinish(lake: Lake, segment: str) -> None:
    """What a killed rerun leaves: the markers removed first, the tables not rewritten yet."""
    for stage in STAGE_TABLES:
        Path(lake.marker(stage, Partition(CRAWL, segment))).unlink()


def sql_json(capsys: pytest.CaptureFixture[str], lake: Path | str, query: str) -> list[dict]:
    assert main(["sql", str(lake), query, "--format", "json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_unfinished_partitions_are_invisible(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lake = two_partitions(tmp_path)
    con = sandboxed_candidates(str(tmp_path))
    assert con.execute("SELECT count(*) FROM candidates").fetchone() == (2 * KEPT,)  # both finished

    unfinish(lake, "001")
    # The tables of 001 are still valid parquet; without its marker none of its rows may be read.
    con = sandboxed_candidates(str(tmp_path))
    assert con.execute("SELECT count(*), max(uid) FROM candidates").fetchone() == (KEPT, 5)
    rows = sql_json(capsys, tmp_path, "SELECT segment, count(*) AS n FROM clip GROUP BY 1 ORDER BY 1")
    assert rows == [{"segment": "000", "n": len(ROWS)}]

    # A half-written table in the unfinished partition is never opened.
    Path(lake.table("pairs", Partition(CRAWL, "001"))).write_bytes(b"PAR1 half written")
    rows = sql_json(capsys, tmp_path, "SELECT count(*) AS n, count(DISTINCT segment) AS s FROM pairs")
    assert rows == [{"n": len(ROWS), "s": 1}]
    con = sandboxed_candidates(str(tmp_path))
    assert con.execute("SELECT count(*) FROM candidates").fetchone() == (KEPT,)
    assert io.finished_partitions(lake.stage_dir("pairs")) == [Partition(CRAWL, "000")]


def test_a_stage_with_no_finished_partition_has_no_view(tmp_path: Path) -> None:
    lake = two_partitions(tmp_path)
    for segment in ("000", "001"):
        Path(lake.marker("dedupe", Partition(CRAWL, segment))).unlink()
    _, views = connect(str(tmp_path))
    assert views == ["pairs", "downloads", "clip"]
    con = sandboxed_candidates(str(tmp_path))  # candidates without dedupe: nobody is a survivor
    assert con.execute("SELECT count(*), count(*) FILTER (WHERE survivor) FROM candidates").fetchone() == (
        2 * KEPT, 0)


@pytest.mark.parametrize("name", [
    "lake [v2]",            # a glob character class: fsspec's glob matched nothing here
    "l*ke?{a,b}",           # other glob characters
    "run=7/crawl=bogus",    # hive-style folders above the lake: DuckDB would read them as columns
])
def test_glob_and_hive_characters_in_the_lake_path(name: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / name / "lake"
    lake = two_partitions(root)
    unfinish(lake, "001")
    write_lake(root, ROWS, segment="002")  # a third partition, finished
    assert io.finished_partitions(lake.stage_dir("clip")) == [Partition(CRAWL, "000"), Partition(CRAWL, "002")]
    tables = io.finished_tables(lake.stage_dir("clip"), STAGE_TABLES["clip"])
    assert tables == [lake.table("clip", Partition(CRAWL, s)) for s in ("000", "002")]
    assert io.finished_tables(lake.stage_dir("clip"), STAGE_TABLES["clip"],
                              exclude_dir=lake.partition_dir("clip", Partition(CRAWL, "000"))) == tables[1:]

    rows = sql_json(capsys, root, "SELECT crawl, segment, count(*) AS n FROM downloads GROUP BY ALL ORDER BY 2")
    assert rows == [{"crawl": CRAWL, "segment": "000", "n": len(ROWS)},
                    {"crawl": CRAWL, "segment": "002", "n": len(ROWS)}]
    con, views = connect(str(root))
    assert views == list(STAGE_TABLES)
    assert "run" not in con.table("clip").columns  # no column made up from the lake's own path
    con = sandboxed_candidates(str(root))
    assert con.execute("SELECT count(*), count(DISTINCT segment) FROM candidates").fetchone() == (2 * KEPT, 2)


def test_markers_only_count_in_partition_folders(tmp_path: Path) -> None:
    """A marker elsewhere in the stage folder (the dedupe state, a stray copy) makes no partition."""
    lake = two_partitions(tmp_path)
    stray = Path(lake.stage_dir("dedupe")) / "_state" / "crawl=x" / SUCCESS_MARKER
    stray.parent.mkdir(parents=True)
    stray.write_text("{}")
    assert io.finished_partitions(lake.stage_dir("dedupe")) == [Partition(CRAWL, "000"), Partition(CRAWL, "001")]
    assert io.finished_partitions(str(tmp_path / "no-such-stage")) == []
