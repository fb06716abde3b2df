"""curation.subsets on a hand-built lake: definitions, bound parameters, the sandbox, releases and diffs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.io import write_marker
from curation.layout import Lake, Partition
from curation.subsets import (
    BUILTIN_SUBSETS,
    SubsetDefinition,
    export_subset,
    latest_release,
    load_registry,
    read_release,
    release_history,
    sandboxed_candidates,
    select,
)

CRAWL = "CC-MAIN-2030-01"
ROWS = [  # uid, aesthetic, punsafe, pwatermark, width, survivor, keep
    (1, 7.0, 0.1, 0.1, 1200, True, True),
    (2, 6.5, 0.9, 0.1, 1300, True, True),   # unsafe
    (3, 6.2, 0.1, 0.95, 800, True, True),   # watermarked
    (4, 4.0, 0.1, 0.1, 2000, True, True),   # not aesthetic
    (5, 8.0, 0.1, 0.1, 640, False, True),   # a duplicate
    (6, 9.0, 0.0, 0.0, 3000, True, False),  # dropped by the CLIP filter
]


def write_lake(root: Path, rows: list[tuple], segment: str = "000") -> None:
    part = Partition(CRAWL, segment)
    lake = Lake(str(root))
    n = len(rows)
    uid = [r[0] for r in rows]
    tables = {
        "pairs": {"uid": uid, "url": [f"http://example.com/{u}.jpg" for u in uid],
                  "text": [f"caption {u}" for u in uid], "language": ["en"] * n},
        "downloads": {"uid": uid, "status": ["success"] * n, "original_width": [r[4] for r in rows],
                      "original_height": [r[4] for r in rows], "width": [256] * n, "height": [256] * n,
                      "sha256": [f"{u:064x}" for u in uid], "shard": ["00000"] * n,
                      "key": [f"{i:09d}" for i in range(n)]},
        "clip": {"uid": uid, "keep": [r[6] for r in rows], "similarity": [0.3] * n, "aesthetic": [r[1] for r in rows],
                 "punsafe": [r[2] for r in rows], "pwatermark": [r[3] for r in rows], "nsfw_tag": ["UNLIKELY"] * n,
                 "clip_model": ["toy"] * n},
        "dedupe": {"uid": [r[0] for r in rows if r[6]], "survivor": [r[5] for r in rows if r[6]],
                   "cluster_id": [r[0] for r in rows if r[6]],
                   "reason": [None if r[5] else "near_duplicate_phash" for r in rows if r[6]]},
    }
    for stage, cols in tables.items():
        path = Path(lake.table(stage, part))
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), path)
        write_marker(str(path.parent), {"rows": len(cols["uid"])})  # readers see finished partitions only


AESTHETIC = {d.name: d for d in BUILTIN_SUBSETS}["laion_aesthetic"]
HIGH_RES = {d.name: d for d in BUILTIN_SUBSETS}["laion_high_res"]


def uids(table: pa.Table) -> list[int]:
    return sorted(table.column("uid").to_pylist())


def test_builtin_subsets_follow_laion_rules(tmp_path: Path) -> None:
    write_lake(tmp_path, ROWS)
    con = sandboxed_candidates(str(tmp_path))
    assert uids(select(con, AESTHETIC, AESTHETIC.resolve_params())) == [1]
    assert uids(select(con, HIGH_RES, HIGH_RES.resolve_params())) == [1, 2, 4]
    assert uids(select(con, AESTHETIC, AESTHETIC.resolve_params({"min_aesthetic": "3.5"}))) == [1, 4]


def test_definitions_are_validated() -> None:
    with pytest.raises(ValueError, match="undeclared parameters"):
        SubsetDefinition("x", "", (("a", "aesthetic > $nope"),))
    with pytest.raises(ValueError, match="one expression"):
        SubsetDefinition("x", "", (("a", "true; DROP TABLE candidates"),))
    with pytest.raises(ValueError, match="must match"):
        SubsetDefinition("Bad Name", "", (("a", "true"),))
    with pytest.raises(ValueError, match="at least one condition"):
        SubsetDefinition("x", "", ())
    with pytest.raises(ValueError, match="has no parameter"):
        AESTHETIC.resolve_params({"min_beauty": 3})
    with pytest.raises(ValueError, match="is not a float"):
        AESTHETIC.resolve_params({"min_aesthetic": "6 OR 1=1"})


def test_parameters_are_bound_never_spliced(tmp_path: Path) -> None:
    """A string parameter holding SQL is compared as a string: it matches nothing and breaks nothing."""
    write_lake(tmp_path, ROWS)
    defn = SubsetDefinition("by_tag", "", (("tag", "nsfw_tag = $tag"),), (("tag", "UNLIKELY"),))
    con = sandboxed_candidates(str(tmp_path))
    assert uids(select(con, defn, defn.resolve_params())) == [1, 2, 3, 4]
    assert select(con, defn, defn.resolve_params({"tag": "x' OR '1'='1"})).num_rows == 0
    assert con.execute("SELECT count(*) FROM candidates").fetchone() == (5,)


def test_conditions_cannot_reach_outside_the_lake(tmp_path: Path) -> None:
    write_lake(tmp_path, ROWS)
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n")
    defn = SubsetDefinition("nosy", "", (("peek", f"uid IN (SELECT a FROM read_csv('{secret}'))"),))
    con = sandboxed_candidates(str(tmp_path))
    with pytest.raises(ValueError, match="do not evaluate"):
        select(con, defn, {})
    with pytest.raises(Exception, match="configuration"):
        con.execute("SET enable_external_access = true")


def test_releases_are_versioned_and_diffed_with_reasons(tmp_path: Path) -> None:
    write_lake(tmp_path, ROWS)
    first = export_subset(str(tmp_path), HIGH_RES)
    assert (first.release, first.rows, first.added, first.added_by_reason) == (1, 3, 3, {"first_release": 3})
    assert export_subset(str(tmp_path), HIGH_RES).new_release is False
    changed = [list(r) for r in ROWS]
    changed[0][5] = False  # uid 1 became a duplicate
    changed[1][6] = False  # uid 2 is no longer kept
    write_lake(tmp_path, [tuple(r) for r in changed])
    write_lake(tmp_path, [(7, 5.0, 0.0, 0.0, 1500, True, True)], segment="001")
    second = export_subset(str(tmp_path), HIGH_RES)
    assert (second.release, second.rows, second.previous_release) == (2, 2, 1)
    assert second.removed_by_reason == {"duplicate:near_duplicate_phash": 1, "not_kept": 1}
    assert second.added_by_reason == {"new_partition": 1}
    tighter = export_subset(str(tmp_path), HIGH_RES, {"min_side": 1600})
    assert tighter.removed_by_reason == {"high_res": 1} and tighter.rows == 1
    assert [r["release"] for r in release_history(str(tmp_path), "laion_high_res")] == [1, 2, 3]
    latest = latest_release(str(tmp_path), "laion_high_res")
    assert latest is not None and latest["params"] == {"min_side": 1600}
    assert uids(read_release(str(tmp_path), "laion_high_res", latest)) == [4]


def test_parts_are_img2dataset_compatible(tmp_path: Path) -> None:
    write_lake(tmp_path, ROWS)
    defn = SubsetDefinition("everything", "", (("all", "true"),), survivors_only=False, parts=2)
    r = export_subset(str(tmp_path), defn)
    assert r.parts == ["part-00000-of-00002.parquet", "part-00001-of-00002.parquet"]
    tables = [pq.read_table(Path(r.path) / p) for p in r.parts]
    assert sum(t.num_rows for t in tables) == 5
    assert tables[0].column_names[:2] == ["url", "caption"]


def test_registry_adds_and_replaces_definitions(tmp_path: Path) -> None:
    registry = tmp_path / "subsets.yaml"
    registry.write_text("subsets:\n"
                        "  - name: laion_high_res\n    description: bigger\n"
                        "    conditions: {high_res: 'original_width >= $min_side'}\n    params: {min_side: 2048}\n"
                        "  - name: tiny\n    conditions: {small: 'original_width < 300'}\n")
    defs = {d.name: d for d in load_registry(str(registry))}
    assert set(defs) == {"laion_aesthetic", "laion_high_res", "tiny"}
    assert dict(defs["laion_high_res"].params) == {"min_side": 2048}
    (tmp_path / "bad.json").write_text(json.dumps([{"name": "x", "conditions": {"a": "true"}, "colour": "red"}]))
    with pytest.raises(ValueError, match="unknown keys"):
        load_registry(str(tmp_path / "bad.json"))
