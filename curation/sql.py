"""SQL over the lake: a DuckDB connection with one view per stage table, and the `kept` view over them."""

from __future__ import annotations

from collections.abc import Collection

import duckdb
import pyarrow as pa

from curation import records as R
from curation.io import finished_tables
from curation.layout import STAGE_TABLES, Lake, Partition

# DuckDB's column with each row's file (read_parquet(filename=True)); the lake's tables have no such column.
_FILE = "filename"


def connect(lake_root: str, partitions: Collection[Partition] | None = None
            ) -> tuple[duckdb.DuckDBPyConnection, list[str]]:
    """An in-memory DuckDB with a view per stage that has finished partitions (`pairs`, `downloads`, …);
    `partitions` limits every view to those partitions' files (all by default).

    Only partitions whose success marker exists are visible: a partition being rewritten, or left half
    written by a killed run, is not read. Views are built with the relational API from the listed table
    files, never by formatting SQL text, and the files are listed, not globbed, so any characters in the
    lake's path are plain characters. Partition columns `crawl` and `segment` come from the folder names.
    """
    con = duckdb.connect()
    lake = Lake(lake_root)
    views = []
    for stage, table_name in STAGE_TABLES.items():
        stage_dir = lake.stage_dir(stage)
        files = finished_tables(stage_dir, table_name)
        if partitions is not None:
            wanted = {f"crawl={p.crawl}/segment={p.segment}" for p in partitions}
            files = [f for f in files if "/".join(f.rsplit("/", 3)[1:3]) in wanted]
        if not files:
            continue
        _stage_relation(con, stage_dir, files).create_view(stage)
        views.append(stage)
    return con, views


def _stage_relation(con: duckdb.DuckDBPyConnection, stage_dir: str, files: list[str]) -> duckdb.DuckDBPyRelation:
    if "=" not in stage_dir:
        return con.read_parquet(files, hive_partitioning=True, union_by_name=True)
    # DuckDB reads every `key=value` folder of a path as a partition column, the lake's own path included
    # (a lake under `/runs/crawl=x/` would give every row crawl `x`): take crawl and segment from the
    # partition folders of each file instead, joined on the file name.
    rel = con.read_parquet(files, hive_partitioning=False, union_by_name=True, filename=True)
    folders = [path.rsplit("/", 3)[1:3] for path in files]
    where = con.from_arrow(pa.table({
        _FILE: files,
        "_crawl": [crawl.split("=", 1)[1] for crawl, _ in folders],
        "_segment": [segment.split("=", 1)[1] for _, segment in folders],
    }))
    column = duckdb.ColumnExpression
    data = [column(c) for c in rel.columns if c not in (_FILE, R.CRAWL, R.SEGMENT)]
    return rel.join(where, _FILE).select(*data, column("_crawl").alias(R.CRAWL), column("_segment").alias(R.SEGMENT))


KEPT_VIEW = "kept"
# The pairs the CLIP filter kept, with their download and scores: what search hits and subset candidates
# are described by. Every kept pair was downloaded (dedupe's partition_counts_agree check), so the inner
# join loses none.
KEPT_SQL = """
    SELECT p.uid, p.url, p.text AS caption, p.language, p.crawl, p.segment,
           d.original_width, d.original_height, d.width, d.height, d.sha256, d.shard AS source_shard,
           d.key AS source_key,
           c.similarity, c.punsafe, c.pwatermark, c.aesthetic, c.nsfw_tag, c.clip_model
    FROM pairs p
    JOIN clip c USING (uid, crawl, segment)
    JOIN downloads d USING (uid, crawl, segment)
    WHERE c.keep
"""


def connect_kept(lake_root: str, partitions: Collection[Partition] | None = None
                 ) -> tuple[duckdb.DuckDBPyConnection, list[str]]:
    """`connect` plus the `kept` view (KEPT_SQL); views listed dependents first, so dropping in order works.

    Raises FileNotFoundError naming the stages that have no data yet.
    """
    con, views = connect(lake_root, partitions)
    missing = {"pairs", "downloads", "clip"} - set(views)
    if missing:
        raise FileNotFoundError(f"the lake at {lake_root} has no {sorted(missing)} tables yet: materialize them first")
    con.execute(f"CREATE VIEW {KEPT_VIEW} AS {KEPT_SQL}")
    return con, [KEPT_VIEW, *views]
