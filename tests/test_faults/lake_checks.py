"""What a reader sees in a lake after a kill, and how a rerun's lake compares with a clean reference run's.

Reader checks (between the kill and the rerun) only look through the lake's own read paths: success markers,
`curation.sql.connect`, `load_index`, `latest_release`, `verify_*`. The comparison (after the rerun) is file by
file against a lake where the same stage ran once, cleanly, from an identical copy: every file the reference has,
with the same content (tables compared sorted by uid, timing fields left out), and no file it lacks.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import io
from curation import records as R
from curation.layout import STAGE_TABLES, SUCCESS_MARKER, Lake, Partition

# Fields that measure time (img2dataset's shard stats, the index's query latency, a release's creation time).
TIMING_KEYS = frozenset({"duration", "start_time", "end_time", "created_unix", "query_ms_p50", "query_ms_p99",
                         "seconds", "build_seconds"})
# Names the write paths use for work in progress: atomic_path's temp siblings, download staging, swapped-out shards.
IN_PROGRESS = (".tmp-", ".staging-", ".old-")


def partitions_on_disk(lake: str, stage: str) -> list[Partition]:
    """Every partition folder of a stage, finished or not."""
    root = Path(Lake(lake).stage_dir(stage))
    out = []
    for seg_dir in sorted(root.glob("crawl=*/segment=*")):
        out.append(Partition(seg_dir.parent.name.split("=", 1)[1], seg_dir.name.split("=", 1)[1]))
    return out


def _table(path: str | Path) -> pa.Table:
    return pq.read_table(str(path))


def _one_per_pair(lake: Lake, stage: str, part: Partition, table: pa.Table) -> list[str]:
    """downloads and clip hold exactly one row per pairs row of the partition (while its pairs are being
    rewritten, the pairs are hidden and there is nothing to compare with: that is staleness, not a fault)."""
    pairs_path = lake.table("pairs", part)
    if io.read_marker(lake.partition_dir("pairs", part)) is None:
        return []
    want = np.sort(_table(pairs_path).column(R.UID).to_numpy())
    got = np.sort(table.column(R.UID).to_numpy())
    if len(want) != len(got) or (want != got).any():
        return [f"{stage} {part.key}: {len(got)} rows for {len(want)} pairs "
                f"({len(np.setdiff1d(want, got))} pairs without a row, {len(got) - len(np.unique(got))} duplicates)"]
    return []


def reader_view_problems(lake_root: str) -> list[str]:
    """What is wrong with the lake as its readers see it (empty when sound), at any moment.

    Per-partition stages: every partition with a marker has a readable table with the marker's row count, unique
    uids, and (downloads, clip) one row per pair, consistent shards and aligned embeddings; `curation.sql.connect`
    shows exactly the finished partitions with those row counts. Global stages: the committed dedupe state, index
    generation and subset release are complete (see the helpers below).
    """
    from curation.download import verify_shards
    from curation.scoring import verify_clip_partition

    lake = Lake(lake_root)
    problems: list[str] = []
    finished: dict[str, dict[tuple[str, str], int]] = {}
    for stage in STAGE_TABLES:
        finished[stage] = {}
        for part in partitions_on_disk(lake_root, stage):
            marker = io.read_marker(lake.partition_dir(stage, part))
            if marker is None:
                continue
            try:
                table = _table(lake.table(stage, part))
            except (OSError, pa.ArrowInvalid) as exc:
                problems.append(f"{stage} {part.key} has a marker but no readable table: {exc}")
                continue
            finished[stage][(part.crawl, part.segment)] = table.num_rows
            if table.num_rows != marker.get("rows"):
                problems.append(f"{stage} {part.key}: marker says {marker.get('rows')} rows, "
                                f"table has {table.num_rows}")
            uids = table.column(R.UID).to_numpy()
            if len(np.unique(uids)) != len(uids):
                problems.append(f"{stage} {part.key}: {len(uids) - len(np.unique(uids))} duplicate uids")
            if stage in ("downloads", "clip"):
                problems += _one_per_pair(lake, stage, part, table)
            if stage == "downloads":
                problems += [f"downloads {part.key}: {p}" for p in verify_shards(table, lake.shards_dir(part))]
            if stage == "clip":
                problems += [f"clip {part.key}: {p}" for p in verify_clip_partition(lake_root, part)]
    problems += _sql_problems(lake_root, finished)
    problems += dedupe_problems(lake_root, finished["dedupe"])
    problems += index_problems(lake_root)
    problems += subset_problems(lake_root)
    return problems


def _sql_problems(lake_root: str, finished: dict[str, dict[tuple[str, str], int]]) -> list[str]:
    """`curation.sql.connect` shows every finished partition with its marker's rows, and nothing else."""
    from curation.sql import connect

    con, views = connect(lake_root)
    problems = []
    try:
        for stage, parts in finished.items():
            if stage not in views:
                if parts:
                    problems.append(f"sql: no {stage} view although {len(parts)} partitions are finished")
                continue
            rows = con.sql(f'SELECT crawl, segment, count(*), count(DISTINCT uid) FROM "{stage}" '
                           "GROUP BY crawl, segment").fetchall()
            seen = {(str(c), str(s)): (int(n), int(d)) for c, s, n, d in rows}
            for key, (n, distinct) in sorted(seen.items()):
                if key not in parts:
                    problems.append(f"sql: {stage} view shows unfinished partition {key} ({n} rows)")
                elif parts[key] != n or distinct != n:
                    problems.append(f"sql: {stage} view shows {n} rows ({distinct} distinct uids) of {key}, "
                                    f"its table has {parts[key]}")
            problems += [f"sql: {stage} view lacks finished partition {k}" for k in sorted(set(parts) - set(seen))]
    finally:
        con.close()
    return problems


def dedupe_problems(lake_root: str, finished: dict[tuple[str, str], int]) -> list[str]:
    """The committed dedupe state loads (state.json and its generation's tables), and `verify_dedupe`'s row check
    passes for every partition with a dedupe marker: one row per participating clip row."""
    from curation.dedupe import EMBEDDING_EDGES_FILE, NODES_FILE, PHASH_EDGES_FILE, STATE_FILE, state_dir, verify_dedupe

    state_file = Path(state_dir(lake_root)) / STATE_FILE
    if not state_file.exists():
        return [f"dedupe {k}: a marker without any committed dedupe state" for k in sorted(finished)]
    meta = json.loads(state_file.read_text())
    gen = state_file.parent / f"gen-{int(meta['generation']):06d}"
    problems = []
    for name in (NODES_FILE, PHASH_EDGES_FILE, EMBEDDING_EDGES_FILE):
        try:
            _table(gen / name)
        except (OSError, pa.ArrowInvalid) as exc:
            problems.append(f"dedupe state generation {meta['generation']}: {name} unreadable: {exc}")
    marked = [Partition(c, s) for c, s in sorted(finished)]
    problems += [f"dedupe: {p}" for p in verify_dedupe(lake_root, marked)["rows"]
                 if not p.endswith(": no dedupe marker")]
    return problems


def dedupe_cluster_problems(lake_root: str) -> list[str]:
    """`verify_dedupe`'s cluster check over every partition with a dedupe marker (see the report: after a kill,
    partitions rewritten by the killed run and partitions still from the last commit can disagree)."""
    from curation.dedupe import verify_dedupe

    marked = [p for p in partitions_on_disk(lake_root, "dedupe")
              if io.read_marker(Lake(lake_root).partition_dir("dedupe", p)) is not None]
    return verify_dedupe(lake_root, marked)["clusters"]


def index_problems(lake_root: str) -> list[str]:
    """The committed index generation (if any) loads, and its index, id table and manifest agree with each other and
    with the dedupe survivors of the partitions the manifest covers."""
    from curation.index import Manifest, index_ids, indexable_partitions, load_index

    manifest = Manifest.load(lake_root, "image")
    if manifest is None:
        try:
            load_index(lake_root)
        except FileNotFoundError:
            return []
        return ["index: load_index loaded an index without a committed manifest"]
    loaded = load_index(lake_root)
    ids = index_ids(lake_root)
    problems = []
    if not loaded.index.ntotal == ids.num_rows == manifest.vectors:
        problems.append(f"index generation {manifest.generation}: {loaded.index.ntotal} vectors, {ids.num_rows} ids, "
                        f"manifest {manifest.vectors}")
    uids = ids.column(R.UID).to_numpy()
    if len(np.unique(uids)) != len(uids):
        problems.append(f"index generation {manifest.generation}: duplicate ids")
    survivors = {p.partition.key: p for p in indexable_partitions(lake_root)}
    for key, digest in manifest.partitions.items():
        now = survivors.get(key)
        if now is not None and now.digest == digest:
            keys = pc.binary_join_element_wise(ids.column(R.CRAWL), ids.column(R.SEGMENT), "|")
            got = np.sort(ids.filter(pc.equal(keys, key)).column(R.UID).to_numpy())
            if len(got) != len(now.uids) or (got != now.uids).any():
                problems.append(f"index generation {manifest.generation}: ids of {key} differ from its survivors")
    return problems


def subset_problems(lake_root: str) -> list[str]:
    """Every subset's latest release is complete: its parts read back with release.json's row count, its shards
    open, and no release above it is listed by `release_history`."""
    from curation.subsets import latest_release, read_release, release_history

    problems = []
    root = Path(lake_root) / "subsets"
    for subset in sorted(p.name for p in root.iterdir()) if root.exists() else []:
        release = latest_release(lake_root, subset)
        if release is None:
            continue
        table = read_release(lake_root, subset, release)
        if table.num_rows != release["rows"]:
            problems.append(f"subset {subset} release {release['release']}: {table.num_rows} rows, "
                            f"release.json says {release['rows']}")
        uids = table.column("uid").to_numpy()
        if len(np.unique(uids)) != len(uids):
            problems.append(f"subset {subset} release {release['release']}: duplicate uids")
        base = root / subset / release["path"]
        samples = 0
        for shard in release.get("shards", []):
            try:
                with tarfile.open(base / shard) as tar:
                    samples += sum(1 for n in tar.getnames() if n.endswith(".json"))
            except (OSError, tarfile.TarError) as exc:
                problems.append(f"subset {subset} release {release['release']}: shard {shard} unreadable: {exc}")
        if release.get("shards") and samples != release["rows"]:
            problems.append(f"subset {subset} release {release['release']}: {samples} samples in shards, "
                            f"{release['rows']} rows")
        if [r["release"] for r in release_history(lake_root, subset)][-1:] != [release["release"]]:
            problems.append(f"subset {subset}: release_history does not end at the latest release")
    return problems


# ----------------------------------------------------------------------------------------------- comparison


def _strip_timing(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_strip_timing(v) for v in obj]
    return obj


def _sorted_table(path: Path) -> pa.Table:
    """A table in a canonical row order (uid first where there is one): reruns may order rows differently."""
    table = _table(path)
    sortable = [f.name for f in table.schema if pa.types.is_integer(f.type) or pa.types.is_string(f.type)
                or pa.types.is_floating(f.type) or pa.types.is_boolean(f.type)]
    keys = sorted(sortable, key=lambda c: c != R.UID)
    return table.sort_by([(c, "ascending") for c in keys]) if keys else table


def _tar_content(path: Path) -> list[tuple[str, str]]:
    """(name, sha256 of the bytes) of every member, sorted; tar headers (mtimes) left out."""
    out = []
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            f = tar.extractfile(member)
            out.append((member.name, hashlib.sha256(f.read() if f else b"").hexdigest()))
    return sorted(out)


def _same_file(a: Path, b: Path) -> bool:
    if a.suffix == ".parquet":
        return _sorted_table(a).equals(_sorted_table(b))
    if a.suffix == ".json":
        return bool(_strip_timing(json.loads(a.read_text())) == _strip_timing(json.loads(b.read_text())))
    if a.suffix == ".npy":
        x, y = np.load(a, allow_pickle=False), np.load(b, allow_pickle=False)
        return x.dtype == y.dtype and x.shape == y.shape and bool((x == y).all())
    if a.suffix == ".tar":
        return _tar_content(a) == _tar_content(b)
    return a.read_bytes() == b.read_bytes()


def lake_files(root: str) -> set[str]:
    return {str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file()}


@dataclass
class Comparison:
    """How a rerun's lake differs from the reference lake."""

    problems: list[str] = field(default_factory=list)
    rows_lost: int = 0
    duplicates: int = 0
    rows_extra: int = 0


def compare_lakes(lake: str, reference: str) -> Comparison:
    """File by file: the same files (none missing, none extra: no leftover temp or staging file), each with the
    same content. Rows lost / extra / duplicated are counted over every table with a uid column."""
    out = Comparison()
    mine, theirs = lake_files(lake), lake_files(reference)
    out.problems += [f"leftover file {f}" for f in sorted(mine - theirs)]
    out.problems += [f"missing file {f}" for f in sorted(theirs - mine)]
    out.problems += [f"work-in-progress name left in the lake: {f}" for f in sorted(mine)
                     if any(tag in part for part in Path(f).parts for tag in IN_PROGRESS)]
    for rel in sorted(mine & theirs):
        a, b = Path(lake) / rel, Path(reference) / rel
        if a.suffix == ".parquet":
            ta, tb = _table(a), _table(b)
            if R.UID in ta.column_names and R.UID in tb.column_names:
                got = Counter(ta.column(R.UID).to_pylist())
                want = Counter(tb.column(R.UID).to_pylist())
                out.rows_lost += sum((want - got).values())
                out.rows_extra += sum((got - want).values())
                out.duplicates += sum(n - 1 for n in got.values() if n > 1) - sum(n - 1 for n in want.values() if n > 1)
        if not _same_file(a, b):
            out.problems.append(f"{rel} differs from the reference run's")
    return out


def markers_honest(lake_root: str) -> list[str]:
    """Every marker's `rows` equals its table's rows (used after the rerun, on the whole lake)."""
    problems = []
    for marker in sorted(Path(lake_root).rglob(SUCCESS_MARKER)):
        data = json.loads(marker.read_text())
        tables = [p for p in marker.parent.glob("*.parquet")]
        if "rows" in data and len(tables) == 1 and _table(tables[0]).num_rows != data["rows"]:
            problems.append(f"{marker.relative_to(lake_root)} says {data['rows']} rows")
    return problems
