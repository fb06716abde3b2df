"""SQL over the lake: a DuckDB connection with one view per stage table."""

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
