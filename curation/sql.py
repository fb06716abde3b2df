"""SQL over the lake: a DuckDB connection with one view per stage table, and the `kept` view over them."""

from __future__ import annotations

import duckdb

from curation.io import filesystem
from curation.layout import STAGE_TABLES, Lake


def connect(lake_root: str) -> tuple[duckdb.DuckDBPyConnection, list[str]]:
    """An in-memory DuckDB with a view per stage that has data (`pairs`, `downloads`, …).

    Views are built with the relational API from the lake's own paths, never by formatting SQL text.
    Partition columns `crawl` and `segment` come from the hive-style folder names.
    """
    con = duckdb.connect()
    lake = Lake(lake_root)
    views = []
    for stage in STAGE_TABLES:
        pattern = lake.table_glob(stage)
        fs, p = filesystem(pattern)
        if not fs.glob(p):
            continue
        con.read_parquet(pattern, hive_partitioning=True, union_by_name=True).create_view(stage)
        views.append(stage)
    return con, views


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


def connect_kept(lake_root: str) -> tuple[duckdb.DuckDBPyConnection, list[str]]:
    """`connect` plus the `kept` view (KEPT_SQL); views listed dependents first, so dropping in order works.

    Raises FileNotFoundError naming the stages that have no data yet.
    """
    con, views = connect(lake_root)
    missing = {"pairs", "downloads", "clip"} - set(views)
    if missing:
        raise FileNotFoundError(f"the lake at {lake_root} has no {sorted(missing)} tables yet: materialize them first")
    con.execute(f"CREATE VIEW {KEPT_VIEW} AS {KEPT_SQL}")
    return con, [KEPT_VIEW, *views]
