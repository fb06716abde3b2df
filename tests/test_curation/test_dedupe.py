"""Global layered dedupe: every layer, survivor rules, reasons, incremental == one-shot, idempotent reruns."""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from curation import io
from curation import records as R
from curation.dedupe import (
    EMBEDDING_EDGES_FILE,
    NODES_FILE,
    PHASH_EDGES_FILE,
    DedupeConfig,
    DedupeResult,
    dedupe_lake,
    forget_partition,
    input_digest,
    state_dir,
    verify_dedupe,
)
from curation.layout import Lake, Partition
from curation.phash import to_hex

A = Partition("CC-MAIN-2024-10", "000")
A2 = Partition("CC-MAIN-2024-10", "001")
B = Partition("CC-MAIN-2024-18", "000")
DIM = 16


def flip(h: int, bits: range | list[int]) -> int:
    for b in bits:
        h ^= 1 << int(b)
    return h


def far_hash(seed: int) -> int:
    """A random 64-bit hash; two of them are ~32 bits apart (within 6 bits with probability ~1e-11)."""
    return int(np.random.default_rng([seed, 99]).integers(0, 2**64, dtype=np.uint64))


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng([seed, 7]).standard_normal(DIM)
    return v / np.linalg.norm(v)


def at_cosine(base: np.ndarray, cosine: float, seed: int) -> np.ndarray:
    """A unit vector at exactly `cosine` from the unit vector `base`."""
    other = unit(seed)
    other -= other @ base * base
    other /= np.linalg.norm(other)
    return cosine * base + np.sqrt(1 - cosine**2) * other


@dataclass(frozen=True)
class Img:
    """One pair of a test partition; defaults make it unlike every other row on every layer."""

    uid: int
    phash: int | None = None
    sha: str | None = None
    url: str | None = None
    text: str | None = None
    sim: float = 0.3
    width: int = 100
    height: int = 100
    keep: bool = True
    status: str = R.STATUS_OK
    emb: np.ndarray | None = field(default=None, compare=False)

    def resolved(self, part: Partition) -> Img:
        salt = f"{part.key}/{self.uid}"
        return replace(
            self,
            phash=self.phash if self.phash is not None or self.status != R.STATUS_OK else far_hash(hash_int(salt)),
            sha=self.sha or hashlib.sha256(salt.encode()).hexdigest(),
            url=self.url or f"http://img.test/{self.uid}.jpg",
            text=self.text or f"caption {self.uid}",
            emb=self.emb if self.emb is not None else unit(hash_int(salt)),
        )


def hash_int(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little")


def write_partition(root: Path, part: Partition, imgs: list[Img], note: str = "") -> None:
    """Write finished pairs, downloads and clip stages (tables, embeddings, markers) for one partition."""
    lake = Lake(str(root))
    rows = [i.resolved(part) for i in imgs]
    n = len(rows)
    uid = pa.array([r.uid for r in rows], pa.int64())
    ok = [r.status == R.STATUS_OK for r in rows]
    tables = {
        "pairs": pa.table({R.UID: uid, R.URL: [r.url for r in rows], R.TEXT: [r.text for r in rows],
                           R.CRAWL: [part.crawl] * n, R.SEGMENT: [part.segment] * n}),
        "downloads": pa.table({
            R.UID: uid, R.STATUS: [R.STATUS_SUCCESS if o else R.STATUS_FAILED_DOWNLOAD for o in ok],
            R.SHA256: [r.sha if o else None for r, o in zip(rows, ok, strict=True)],
            R.ORIGINAL_WIDTH: pa.array([r.width for r in rows], pa.int32()),
            R.ORIGINAL_HEIGHT: pa.array([r.height for r in rows], pa.int32()),
            R.SHARD: [f"{i // 4:05d}" for i in range(n)], R.KEY: [f"{i:09d}" for i in range(n)]}),
        "clip": pa.table({
            R.UID: uid, R.SIMILARITY: pa.array([r.sim if o else None for r, o in zip(rows, ok, strict=True)],
                                               pa.float32()),
            R.KEEP: [r.keep and o for r, o in zip(rows, ok, strict=True)],
            R.REASON: [None if r.keep else "low_similarity" for r in rows],
            R.STATUS: [r.status for r in rows],
            "phash": pa.array([np.uint64(r.phash).astype(np.int64) if r.phash is not None else None for r in rows],
                              pa.int64())}),
    }
    for stage, table in tables.items():
        io.write_parquet(table, lake.table(stage, part))
    embedded = [r for r in rows if r.status == R.STATUS_OK][::-1]  # uids.npy order differs from the table's
    emb_dir = Path(lake.embeddings_dir(part))
    emb_dir.mkdir(parents=True, exist_ok=True)
    np.save(emb_dir / "img_emb.npy", np.array([r.emb for r in embedded], dtype=np.float16).reshape(-1, DIM))
    np.save(emb_dir / "uids.npy", np.array([r.uid for r in embedded], dtype=np.int64))
    for stage in tables:
        io.write_marker(lake.partition_dir(stage, part), {"rows": n, "note": note})


def dedupe_rows(root: Path, part: Partition) -> dict[int, dict[str, object]]:
    table = pq.read_table(Lake(str(root)).table("dedupe", part))
    return {r["uid"]: r for r in table.to_pylist()}


def cluster_of(rows: dict[int, dict[str, object]], uid: int) -> set[int]:
    cid = rows[uid]["cluster_id"]
    return {u for u, r in rows.items() if r["cluster_id"] == cid}


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file()}


def dedupe_bytes(root: Path) -> dict[str, bytes]:
    """Every dedupe table and marker, plus the state's data files (not state.json: its generation counts runs)."""
    out = {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "dedupe").glob("crawl=*/**/*"))
           if p.is_file()}
    gen = sorted(Path(state_dir(str(root))).glob("gen-*"))
    assert len(gen) == 1, gen  # older generations are removed after the commit
    for name in (NODES_FILE, PHASH_EDGES_FILE, EMBEDDING_EDGES_FILE):
        out[name] = (gen[0] / name).read_bytes()
    return out


def run(root: Path, parts: list[Partition], **config: object) -> DedupeResult:
    return dedupe_lake(str(root), parts, DedupeConfig(**config))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("bad", [dict(radius=-1), dict(radius=65), dict(radius=True), dict(radius=2.0),
                                 dict(embedding_threshold=1.5), dict(embedding_threshold=-1.0),
                                 dict(use_embeddings="yes"), dict(only_kept=1)])
def test_config_is_validated(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DedupeConfig(**bad)  # type: ignore[arg-type]


def test_config_defaults() -> None:
    c = DedupeConfig()
    assert (c.radius, c.use_embeddings, c.embedding_threshold, c.only_kept) == (6, False, 0.94, True)


# ----------------------------------------------------------------------------------------------- layers


def test_every_layer_links_and_the_strongest_link_is_the_reason(tmp_path: Path) -> None:
    h = far_hash(1)
    e = unit(5)
    write_partition(tmp_path, A, [
        Img(1, sim=0.9), Img(2, sim=0.5, sha="s" * 64), Img(3, sim=0.4, sha="s" * 64),  # bytes (1 is a url/text dup)
        Img(4, phash=h, sim=0.5), Img(5, phash=flip(h, range(3)), sim=0.4),  # pHash 3 bits apart
        Img(6, sim=0.5, emb=e), Img(7, sim=0.4, emb=at_cosine(e, 0.97, 8)),  # embeddings only
        Img(8, phash=far_hash(2), sha="t" * 64, sim=0.5), Img(9, phash=far_hash(2), sha="t" * 64, sim=0.4),
        Img(10),  # unlike anything
    ])
    write_partition(tmp_path, B, [Img(1, sim=0.2)])  # same (url, text) as A's uid 1, another image
    result = run(tmp_path, [A, B], use_embeddings=True)
    a, b = dedupe_rows(tmp_path, A), dedupe_rows(tmp_path, B)
    assert cluster_of(a, 2) == {2, 3} and a[3]["reason"] == R.DUPLICATE_BYTES
    assert cluster_of(a, 4) == {4, 5} and a[5]["reason"] == R.NEAR_DUPLICATE_PHASH
    assert cluster_of(a, 6) == {6, 7} and a[7]["reason"] == R.NEAR_DUPLICATE_EMBEDDING
    assert a[9]["reason"] == R.DUPLICATE_BYTES  # same bytes and same pHash: bytes is the stronger layer
    assert b[1]["reason"] == R.DUPLICATE_URL_TEXT and b[1]["cluster_id"] == 1 and a[1]["survivor"]
    assert a[10]["cluster_size"] == 1 and a[10]["survivor"] and a[10]["reason"] is None
    survivors = {u for rows in (a, b) for u, r in rows.items() if r["survivor"]}
    for rows in (a, b):
        for r in rows.values():
            assert (r["reason"] is None) == r["survivor"]
            assert r["cluster_id"] in survivors
    assert result.by_reason == {R.DUPLICATE_URL_TEXT: 1, R.DUPLICATE_BYTES: 2, R.NEAR_DUPLICATE_PHASH: 1,
                                R.NEAR_DUPLICATE_EMBEDDING: 1}
    assert result.duplicates_removed == 5 and result.clusters == 6 and result.nodes == 11
    assert result.cluster_sizes == {1: 1, 2: 5}
    assert result.duplicate_clusters == 5
    assert result.edges_by_layer[R.NEAR_DUPLICATE_EMBEDDING] == 1
    assert result.edges_by_layer[R.DUPLICATE_BYTES] == 2  # {2, 3} and {8, 9}: k-1 links per group


def test_without_embeddings_the_embedding_layer_links_nothing(tmp_path: Path) -> None:
    e = unit(5)
    write_partition(tmp_path, A, [Img(1, emb=e), Img(2, emb=at_cosine(e, 0.97, 8)), Img(3, emb=at_cosine(e, 0.92, 9))])
    off = run(tmp_path, [A])
    assert off.clusters == 3 and off.embedding_queries == 0
    on = run(tmp_path, [A], use_embeddings=True)  # a config change rebuilds the state
    assert on.partitions_updated == (A.key,) and on.embedding_queries == 3
    rows = dedupe_rows(tmp_path, A)
    assert cluster_of(rows, 1) == {1, 2} and rows[3]["cluster_size"] == 1  # 0.97 links, 0.92 does not
    lower = run(tmp_path, [A], use_embeddings=True, embedding_threshold=0.9)
    assert lower.clusters == 1


@pytest.mark.parametrize("radius", [0, 1, 4, 6])
def test_phash_radius_is_exact(tmp_path: Path, radius: int) -> None:
    imgs = []
    for d in range(8):  # one pair per distance, far from every other pair
        base = far_hash(100 + d)
        imgs += [Img(10 * d + 1, phash=base), Img(10 * d + 2, phash=flip(base, range(d)))]
    write_partition(tmp_path, A, imgs)
    run(tmp_path, [A], radius=radius)
    rows = dedupe_rows(tmp_path, A)
    linked = [d for d in range(8) if cluster_of(rows, 10 * d + 1) == {10 * d + 1, 10 * d + 2}]
    assert linked == list(range(radius + 1))
    assert all(rows[10 * d + 2]["reason"] == R.NEAR_DUPLICATE_PHASH for d in linked)


def test_phash_hex_is_imagehash_notation(tmp_path: Path) -> None:
    high = 0xF0E1D2C3B4A59687  # top bit set: stored as a negative int64 upstream
    write_partition(tmp_path, A, [Img(1, phash=high), Img(2, phash=5), Img(3, status=R.STATUS_NOT_DOWNLOADED,
                                                                             keep=False)])
    run(tmp_path, [A], only_kept=False)
    rows = dedupe_rows(tmp_path, A)
    assert rows[1]["phash"] == "f0e1d2c3b4a59687" == to_hex(high)
    assert rows[2]["phash"] == "0000000000000005"
    assert set(rows) == {1, 2}  # a row without an image never takes part


def test_only_kept_rows_take_part(tmp_path: Path) -> None:
    h = far_hash(3)
    write_partition(tmp_path, A, [Img(1, phash=h, sim=0.3), Img(2, phash=h, sim=0.9, keep=False), Img(3)])
    run(tmp_path, [A])
    rows = dedupe_rows(tmp_path, A)
    assert set(rows) == {1, 3} and rows[1]["cluster_size"] == 1 and rows[1]["survivor"]
    run(tmp_path, [A], only_kept=False)
    rows = dedupe_rows(tmp_path, A)
    assert set(rows) == {1, 2, 3} and rows[1]["cluster_id"] == 2 and rows[1]["reason"] == R.NEAR_DUPLICATE_PHASH


# ----------------------------------------------------------------------------------------------- survivors


@pytest.mark.parametrize(("first", "second", "winner"), [
    (dict(sim=0.30, width=500), dict(sim=0.31, part=B), 2),  # highest CLIP similarity first
    (dict(sim=0.3, width=200, height=100), dict(sim=0.3, width=150, height=150), 2),  # then the larger original
    (dict(width=101, part=B), dict(part=A), 1),  # ... even from a later crawl
    (dict(part=B), dict(part=A), 2),  # then the earliest crawl
    (dict(part=A2), dict(part=A), 2),  # then the earliest segment
    (dict(part=Partition("CC-MAIN-2024-18", "000")), dict(part=Partition("CC-MAIN-2024-10", "001")), 2),
    (dict(), dict(), 1),  # then the smallest uid
])
def test_survivor_order(tmp_path: Path, first: dict, second: dict, winner: int) -> None:
    by_part: dict[Partition, list[Img]] = {}
    for uid, spec in ((1, dict(first)), (2, dict(second))):
        part = spec.pop("part", A)
        by_part.setdefault(part, []).append(Img(uid, sha="c" * 64, phash=far_hash(uid), **spec))
    for part, imgs in by_part.items():
        write_partition(tmp_path, part, imgs)
    run(tmp_path, list(by_part))
    rows = {u: r for part in by_part for u, r in dedupe_rows(tmp_path, part).items()}
    loser = 3 - winner
    assert rows[winner]["survivor"] and rows[winner]["reason"] is None
    assert not rows[loser]["survivor"] and rows[loser]["reason"] == R.DUPLICATE_BYTES
    assert rows[1]["cluster_id"] == rows[2]["cluster_id"] == winner
    assert rows[1]["cluster_size"] == rows[2]["cluster_size"] == 2


# ----------------------------------------------------------------------------------------------- incremental


def scenario_a() -> list[Img]:
    h, g = far_hash(11), far_hash(12)
    return [
        Img(1, sha="x" * 64, sim=0.30), Img(2, sha="x" * 64, sim=0.20),  # cluster X
        Img(3, phash=h, sim=0.3), Img(4, phash=flip(h, [40]), sim=0.2),  # cluster Y
        Img(5, phash=flip(h, range(8)), sim=0.3), Img(6, phash=flip(h, [*range(8), 50]), sim=0.2),  # cluster Z
        Img(7, phash=g), Img(8),
    ]


def scenario_b() -> list[Img]:
    h = far_hash(11)
    return [
        Img(21, sha="x" * 64, sim=0.9),  # a better survivor for X
        Img(22, phash=flip(h, range(4)), sim=0.1),  # 4 bits from Y's 3 and Z's 5: bridges them
        Img(23, phash=far_hash(12)),  # the same pHash as A's 7: a value already in the state
        Img(24),
    ]


def test_incremental_equals_one_shot(tmp_path: Path) -> None:
    inc, once = tmp_path / "inc", tmp_path / "once"
    for root in (inc, once):
        write_partition(root, A, scenario_a())
        write_partition(root, B, scenario_b())
    first = run(inc, [A])
    a = dedupe_rows(inc, A)
    assert a[1]["survivor"] and cluster_of(a, 3) == {3, 4} and cluster_of(a, 5) == {5, 6}
    second = run(inc, [A, B])
    assert second.partitions_added == (B.key,) and second.partitions_updated == ()
    assert second.partitions_rewritten == (A.key, B.key)
    # Only B's pHash values that were not in the state were searched: old pairs are never matched again.
    assert (first.phash_values_searched, second.phash_values_searched) == (8, 3)
    run(once, [A, B])
    assert dedupe_bytes(inc) == dedupe_bytes(once)
    a, b = dedupe_rows(inc, A), dedupe_rows(inc, B)
    assert b[21]["survivor"] and a[1]["cluster_id"] == a[2]["cluster_id"] == 21
    assert a[1]["reason"] == R.DUPLICATE_BYTES and not a[1]["survivor"]
    bridged = {a[u]["cluster_id"] for u in (3, 4, 5, 6)} | {b[22]["cluster_id"]}
    assert bridged == {3} and a[5]["cluster_size"] == 5
    assert b[23]["cluster_id"] == 7 and b[23]["reason"] == R.NEAR_DUPLICATE_PHASH


def test_rerun_with_the_same_inputs_writes_nothing(tmp_path: Path) -> None:
    write_partition(tmp_path, A, scenario_a())
    write_partition(tmp_path, B, scenario_b())
    first = run(tmp_path, [A, B])
    before = snapshot(tmp_path)
    again = run(tmp_path, [B, A, A])
    assert snapshot(tmp_path) == before
    assert (again.partitions_added, again.partitions_updated, again.partitions_rewritten) == ((), (), ())
    assert again.generation == first.generation and again.phash_values_searched == 0
    assert again.nodes == first.nodes and again.cluster_sizes == first.cluster_sizes
    # A dedupe table lost downstream is written again, with the same bytes.
    table = Path(Lake(str(tmp_path)).table("dedupe", B))
    shutil.rmtree(table.parent)
    assert run(tmp_path, [A]).partitions_rewritten == (B.key,)
    assert snapshot(tmp_path).keys() == before.keys()
    assert {k: v[0] for k, v in snapshot(tmp_path).items()} == {k: v[0] for k, v in before.items()}


def test_rescored_partition_is_replaced(tmp_path: Path) -> None:
    inc, once = tmp_path / "inc", tmp_path / "once"
    rescored = [replace(i, sim=0.95) if i.uid == 2 else replace(i, phash=far_hash(77)) if i.uid == 4 else i
                for i in scenario_a()]
    write_partition(inc, A, scenario_a())
    write_partition(inc, B, scenario_b())
    run(inc, [A, B])
    write_partition(inc, A, rescored, note="rescored")
    result = run(inc, [A, B])
    assert result.partitions_updated == (A.key,) and result.partitions_added == ()
    write_partition(once, A, rescored, note="rescored")
    write_partition(once, B, scenario_b())
    run(once, [A, B])
    assert dedupe_bytes(inc) == dedupe_bytes(once)
    a = dedupe_rows(inc, A)
    assert a[2]["survivor"] and a[2]["cluster_id"] == 2  # its new similarity beats B's 21
    assert a[4]["cluster_size"] == 1  # its new pHash left the bridged cluster


def test_forget_partition(tmp_path: Path) -> None:
    inc, once = tmp_path / "inc", tmp_path / "once"
    for root in (inc, once):
        write_partition(root, A, scenario_a())
    write_partition(inc, B, scenario_b())
    run(inc, [A, B])
    result = forget_partition(str(inc), B, DedupeConfig())
    assert result.partitions_forgotten == (B.key,) and result.partitions_rewritten == (A.key,)
    assert not Path(Lake(str(inc)).partition_dir("dedupe", B)).exists()
    run(once, [A])
    assert dedupe_bytes(inc) == dedupe_bytes(once)  # incl. the pHash edges of B-only values being pruned
    assert forget_partition(str(inc), B, DedupeConfig()).partitions_forgotten == ()


def test_config_change_rebuilds_from_every_held_partition(tmp_path: Path) -> None:
    inc, once = tmp_path / "inc", tmp_path / "once"
    for root in (inc, once):
        write_partition(root, A, scenario_a())
        write_partition(root, B, scenario_b())
    run(inc, [A, B], radius=4)
    result = run(inc, [B], radius=0)  # A is not listed but is held: rebuilt too
    assert result.partitions_updated == (A.key, B.key)
    run(once, [A, B], radius=0)
    assert dedupe_bytes(inc) == dedupe_bytes(once)
    assert cluster_of(dedupe_rows(inc, A), 3) == {3}


def random_partition(rng: np.random.Generator, part: Partition, pool: list[Img], n: int) -> list[Img]:
    """Fresh rows plus rows planted from a shared pool: exact copies, near pHashes, near embeddings, url/text."""
    imgs: list[Img] = []
    uids = set()
    for _ in range(n):
        uid = int(rng.integers(1, 10**6))
        if uid in uids:
            continue
        src = pool[int(rng.integers(len(pool)))]
        kind = rng.integers(6)
        sim, w = float(rng.choice([0.25, 0.3, 0.35])), int(rng.choice([100, 200]))
        if kind == 0:
            img = Img(uid, sha=src.sha, phash=src.phash, emb=src.emb, sim=sim, width=w)
        elif kind == 1:
            img = Img(uid, phash=flip(src.phash or 0, list(rng.choice(64, int(rng.integers(1, 7)), replace=False))),
                      sim=sim, width=w)
        elif kind == 2 and src.emb is not None:
            img = Img(uid, emb=at_cosine(src.emb, float(rng.choice([0.93, 0.96, 0.99])), uid), sim=sim, width=w)
        elif kind == 3:
            uid = src.uid  # the same (url, text) seen again: same LAION uid
            if uid in uids:
                continue
            img = Img(uid, url=src.url, text=src.text, sim=sim, width=w)
        elif kind == 4:
            img = Img(uid, sim=sim, keep=False)
        else:
            img = Img(uid, sim=sim, width=w)
        uids.add(uid)
        imgs.append(img)
    return imgs


@pytest.mark.parametrize("seed", range(3))
def test_random_histories_equal_one_shot(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pool = [Img(10**7 + i).resolved(A) for i in range(12)]
    parts = [A, A2, B, Partition("CC-MAIN-2024-18", "001")]
    config = dict(radius=4, use_embeddings=True)
    inc, once = tmp_path / "inc", tmp_path / "once"
    final: dict[Partition, list[Img]] = {}
    for step, part in enumerate(rng.permutation(len(parts)).tolist()):
        final[parts[part]] = random_partition(rng, parts[part], pool, 25)
        write_partition(inc, parts[part], final[parts[part]])
        run(inc, list(final), **config)
        if step == 1:  # re-score one partition already in the state
            redo = next(iter(final))
            final[redo] = random_partition(rng, redo, pool, 25)
            write_partition(inc, redo, final[redo], note="rescored")
    gone = parts[int(rng.integers(len(parts)))]
    forget_partition(str(inc), gone, DedupeConfig(**config))  # type: ignore[arg-type]
    del final[gone]
    result = run(inc, list(final), **config)
    for part, imgs in final.items():
        write_partition(once, part, imgs)
    expected = run(once, list(final), **config)
    assert dedupe_bytes(inc) == dedupe_bytes(once)
    assert result.cluster_sizes == expected.cluster_sizes and expected.duplicates_removed > 10
    assert all(n > 0 for n in expected.by_reason.values()), expected.by_reason  # every layer was exercised


# ----------------------------------------------------------------------------------------------- reporting, faults


def test_examples_and_histogram(tmp_path: Path) -> None:
    write_partition(tmp_path, A, scenario_a())
    write_partition(tmp_path, B, scenario_b())
    result = dedupe_lake(str(tmp_path), [A, B], DedupeConfig(), examples=2)
    assert sum(size * count for size, count in result.cluster_sizes.items()) == result.nodes == 12
    assert len(result.examples) == 2
    weakest_first = result.examples[0]  # pHash clusters come before exact ones; the largest first
    assert (weakest_first[0].uid, weakest_first[0].crawl) == (3, A.crawl) and len(weakest_first) == 5
    downloads = pq.read_table(Lake(str(tmp_path)).table("downloads", B)).to_pylist()
    b22 = next(m for m in weakest_first if m.uid == 22)
    assert (b22.shard, b22.key) == next((d["shard"], d["key"]) for d in downloads if d["uid"] == 22)
    assert {m.uid for m in result.examples[1]} == {1, 2, 21} and result.examples[1][0].uid == 21
    marker = io.read_marker(Lake(str(tmp_path)).partition_dir("dedupe", A))
    assert marker is not None and marker["rows"] == 8 and marker["duplicates"] == 5


def test_verify_dedupe_finds_broken_tables(tmp_path: Path) -> None:
    assert verify_dedupe(str(tmp_path), [A])["rows"]  # nothing deduped yet
    write_partition(tmp_path, A, scenario_a())
    write_partition(tmp_path, B, scenario_b())
    run(tmp_path, [A, B])
    assert verify_dedupe(str(tmp_path), [A, B]) == {"clusters": [], "rows": []}
    path = Lake(str(tmp_path)).table("dedupe", B)
    table = pq.read_table(path)
    io.write_parquet(table.filter(pc.not_equal(table.column("uid"), 21)), path)  # the survivor of {1, 2, 21}
    path = Lake(str(tmp_path)).table("dedupe", A)
    rows = pq.read_table(path).to_pylist()
    for r in rows:
        r["reason"] = "made_up" if r["uid"] == 3 else r["reason"]  # a survivor with a reason
    io.write_parquet(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
    problems = verify_dedupe(str(tmp_path), [A, B])
    assert any("cluster 21: 0 survivors" in p for p in problems["clusters"])
    assert "uid 3: survivor=True with reason 'made_up'" in problems["clusters"]
    assert any("cluster_size 3, but 2 rows" in p for p in problems["clusters"])
    assert problems["rows"] == [f"{B.key}: 3 dedupe rows for 4 participating clip rows (1 missing, 0 extra)"]


def test_input_digest_follows_markers_and_tables(tmp_path: Path) -> None:
    write_partition(tmp_path, A, scenario_a())
    lake = Lake(str(tmp_path))
    digest = input_digest(str(tmp_path), A)
    assert input_digest(str(tmp_path), A) == digest
    marker = Path(lake.marker("clip", A))
    stat = marker.stat()
    marker.write_text(marker.read_text().replace('"rows"', '"rows_"'))  # same size, same time, other bytes
    os.utime(marker, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert input_digest(str(tmp_path), A) != digest
    digest = input_digest(str(tmp_path), A)
    os.utime(marker, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a rewritten marker
    assert input_digest(str(tmp_path), A) != digest
    digest = input_digest(str(tmp_path), A)
    table = Path(lake.table("downloads", A))
    table.write_bytes(table.read_bytes() + b"\0")
    assert input_digest(str(tmp_path), A) != digest


def test_unfinished_partition_raises(tmp_path: Path) -> None:
    write_partition(tmp_path, A, scenario_a())
    Path(Lake(str(tmp_path)).marker("clip", A)).unlink()
    with pytest.raises(FileNotFoundError, match="clip"):
        run(tmp_path, [A])


def test_clip_table_without_phash_raises(tmp_path: Path) -> None:
    write_partition(tmp_path, A, scenario_a())
    path = Lake(str(tmp_path)).table("clip", A)
    io.write_parquet(pq.read_table(path).drop_columns(["phash"]), path)
    with pytest.raises(ValueError, match="phash"):
        run(tmp_path, [A])


def test_empty_partition(tmp_path: Path) -> None:
    write_partition(tmp_path, A, [Img(1, keep=False)])
    result = run(tmp_path, [A])
    assert result.nodes == 0 and result.partitions_rewritten == (A.key,) and result.cluster_sizes == {}
    assert pq.read_table(Lake(str(tmp_path)).table("dedupe", A)).num_rows == 0
