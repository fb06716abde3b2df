"""curation.io write helpers: a rewrite of a file removes the temporaries that killed writes of it left behind."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curation.io import write_json, write_parquet


def test_rewrite_removes_temporaries_of_the_same_file_only(tmp_path: Path) -> None:
    # What a process SIGKILLed inside atomic_path leaves: a partial temp sibling that its cleanup never removed.
    stale = tmp_path / f".tmp-{'a' * 32}-table.parquet"
    stale.write_bytes(b"PAR1 half a file")
    other = tmp_path / f".tmp-{'b' * 32}-other.parquet"  # another file's write: not ours to remove
    other.write_bytes(b"x")
    lookalike = tmp_path / ".tmp-notahexdigest-table.parquet"  # not a name atomic_path makes
    lookalike.write_bytes(b"x")

    write_parquet(pa.table({"uid": [1, 2]}), str(tmp_path / "table.parquet"))

    assert not stale.exists()
    assert other.exists() and lookalike.exists()
    assert pq.read_table(tmp_path / "table.parquet").num_rows == 2
    write_json({"rows": 2}, str(tmp_path / "_SUCCESS.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [other.name, lookalike.name, "table.parquet", "_SUCCESS.json"])
