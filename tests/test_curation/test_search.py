"""curation.search and curation.metastore on synthetic lakes, against brute-force oracles: filters before top-k,
clip-retrieval's result dedupe and aesthetic shift, hits described from the store, generations picked up live."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import blocklist
from curation import records as R
from curation.index import IndexConfig, build_index
from curation.io import write_parquet
from curation.layout import Lake, Partition
from curation.metastore import AESTHETIC_RATINGS
from curation.sample.lake import unit_vectors, write_partition
from curation.saved_queries import SavedQuery, match_query
from curation.search import Filters, Generation, SearchEngine
from curation.subsets import SubsetDefinition, export_subset

DIM = 32
CRAWL = "CC-MAIN-2030-05"
FLAT = IndexConfig(flat_max_vectors=100_000, eval_queries=100)
IVF = IndexConfig(flat_max_vectors=500, eval_queries=200, batch_size=1000)


def make_lake(root: Path, sizes: tuple[int, ...] = (1500, 1500), seed: int = 0) -> dict[int, np.ndarray]:
    """Partitions of clustered vectors (a tenth of each marked a non-survivor); uid -> vector of the survivors."""
    vectors = {}
    for i, n in enumerate(sizes):
        uids = np.arange(n, dtype=np.int64) * 104_729 + i * 1_000_003 + seed
        x = unit_vectors(n, DIM, seed=seed * 10 + i)
        survivor = np.arange(n) % 10 != 3
        write_partition(str(root), Partition(CRAWL, f"{i:03d}"), uids, x, survivor=survivor, seed=seed * 10 + i)
        vectors.update({int(u): v for u, v, s in zip(uids, x.astype(np.float16).astype(np.float32), survivor,
                                                     strict=True) if s})
    return vectors


def take_down(root: Path, uids: list[int], list_name: str = "test-list") -> None:
    """Write taken_down.parquet as an ingest does (TAKEN_DOWN_SCHEMA, atomically), holding exactly `uids`."""
    n = len(uids)
    write_parquet(pa.table({
        R.UID: uids, R.CRAWL: [CRAWL] * n, R.SEGMENT: ["000"] * n, blocklist.LIST: [list_name] * n,
        blocklist.KIND: [blocklist.KIND_UID] * n, blocklist.URL_SHA256: [None] * n, blocklist.HOST: [None] * n,
        blocklist.MATCHED_UNIX: [1_700_000_000.0] * n}, schema=blocklist.TAKEN_DOWN_SCHEMA),
        blocklist.taken_down_path(str(root)))


def table(root: Path, stage: str) -> dict[int, dict[str, object]]:
    rows = {}
    for path in sorted((root / stage).glob("crawl=*/segment=*/*.parquet")):
        rows.update({r[R.UID]: r for r in pq.read_table(path).to_pylist()})
    return rows


def brute(vectors: dict[int, np.ndarray], query: np.ndarray, k: int, allowed: set[int] | None = None) -> list[int]:
    uids = [u for u in vectors if allowed is None or u in allowed]
    scores = np.stack([vectors[u] for u in uids]) @ query
    return [uids[i] for i in np.argsort(-scores, kind="stable")[:k]]


@pytest.fixture(scope="module")
def flat_lake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, np.ndarray]]:
    root = tmp_path_factory.mktemp("flat")
    vectors = make_lake(root)
    build_index(str(root), FLAT)
    return root, vectors


def test_store_describes_every_indexed_uid_from_the_lake(flat_lake: tuple[Path, dict[int, np.ndarray]]) -> None:
    root, vectors = flat_lake
    gen = Generation.load(str(root))
    assert sorted(gen.store.uids.tolist()) == sorted(vectors)
    pairs, clip, downloads = table(root, "pairs"), table(root, "clip"), table(root, "downloads")
    some = gen.store.uids[::97]
    for row in gen.describe(gen.store.positions(some).tolist()):
        uid = row[R.UID]
        assert row[R.URL] == pairs[uid][R.URL] and row[R.CAPTION] == pairs[uid][R.TEXT]
        assert row[R.AESTHETIC] == pytest.approx(clip[uid][R.AESTHETIC])
        assert row[R.ORIGINAL_WIDTH] == downloads[uid][R.ORIGINAL_WIDTH]
    np.testing.assert_allclose(gen.store.embeddings(gen.store.positions(some)), np.stack([vectors[u] for u in some]))
    assert gen.store.positions([12345]).tolist() == [-1]


def test_unfiltered_flat_search_is_exact(flat_lake: tuple[Path, dict[int, np.ndarray]]) -> None:
    root, vectors = flat_lake
    gen = Generation.load(str(root))
    queries = unit_vectors(20, DIM, seed=99)
    for q, ranked in zip(queries, gen.search(queries, 15), strict=True):
        got = [int(gen.store.uids[r]) for r, _ in ranked]
        assert got == brute(vectors, q, 15)


@pytest.mark.parametrize("filters", [
    Filters(ranges=(("aesthetic", 6.0, None),)),
    Filters(ranges=(("punsafe", None, 0.05), ("original_width", 1024, None))),
    Filters(languages=("de", "fr")),
    Filters(languages=("",), crawls=(CRAWL,)),
    Filters(safe=True, no_nsfw_tag=True),
    Filters(ranges=(("similarity", 0.44, None), ("pwatermark", 0.0, 0.1))),  # ~1 % pass: fewer than k
])
def test_filters_hold_for_every_hit_and_equal_brute_force(flat_lake: tuple[Path, dict[int, np.ndarray]],
                                                         filters: Filters) -> None:
    root, vectors = flat_lake
    gen = Generation.load(str(root))
    clip, pairs, downloads = table(root, "clip"), table(root, "pairs"), table(root, "downloads")

    def passes(uid: int) -> bool:
        row = {**clip[uid], **pairs[uid], **downloads[uid]}
        bounds = all((lo is None or row[c] >= lo) and (hi is None or row[c] <= hi) for c, lo, hi in filters.ranges)
        return (bounds and (filters.languages is None or row[R.LANGUAGE] in filters.languages)
                and (filters.crawls is None or row[R.CRAWL] in filters.crawls)
                and not (filters.safe and row[R.PUNSAFE] >= 0.5)
                and not (filters.no_nsfw_tag and row[R.NSFW_TAG] == "NSFW"))

    allowed = {u for u in vectors if passes(u)}
    assert 0 < len(allowed) < len(vectors)
    assert int(gen.mask(filters).sum()) == len(allowed)
    queries = unit_vectors(10, DIM, seed=7)
    for q, ranked in zip(queries, gen.search(queries, 40, filters), strict=True):
        got = [int(gen.store.uids[r]) for r, _ in ranked]
        assert set(got) <= allowed
        assert got == brute(vectors, q, 40, allowed)


def test_ivf_filtered_search_keeps_recall(tmp_path: Path) -> None:
    vectors = make_lake(tmp_path, (3000, 3000), seed=5)
    result = build_index(str(tmp_path), IVF)
    assert result.family == "ivf_flat"
    gen = Generation.load(str(tmp_path))
    clip = table(tmp_path, "clip")
    for lo in (5.5, 7.5):  # about half, then about a tenth, of the rows pass
        filters = Filters(ranges=(("aesthetic", lo, None),))
        allowed = {u for u in vectors if clip[u][R.AESTHETIC] >= lo}
        recalls = []
        for q, ranked in zip(queries := unit_vectors(30, DIM, seed=11), gen.search(queries, 10, filters), strict=True):
            got = [int(gen.store.uids[r]) for r, _ in ranked]
            assert len(got) == 10 and set(got) <= allowed
            recalls.append(len(set(got) & set(brute(vectors, q, 10, allowed))) / 10)
        assert np.mean(recalls) >= 0.9, (lo, np.mean(recalls))
    # a handful pass: the first probe (nprobe / sqrt(share)) leaves queries short of k, the widened one finds them all
    lo = sorted(clip[u][R.AESTHETIC] for u in vectors)[-40]
    allowed = {u for u in vectors if clip[u][R.AESTHETIC] >= lo}
    assert gen.manifest.nprobe / np.sqrt(len(allowed) / len(vectors)) < gen.manifest.nlist  # not every list at first
    for ranked in gen.search(unit_vectors(30, DIM, seed=12), len(allowed), Filters(ranges=(("aesthetic", lo, None),))):
        assert {int(gen.store.uids[r]) for r, _ in ranked} == allowed


def test_nothing_passes_gives_no_hits(flat_lake: tuple[Path, dict[int, np.ndarray]]) -> None:
    gen = Generation.load(str(flat_lake[0]))
    assert gen.search(unit_vectors(2, DIM, seed=1), 5, Filters(languages=("xx",))) == [[], []]
    with pytest.raises(ValueError, match="empty"):
        Filters(ranges=(("aesthetic", 7.0, 6.0),))
    with pytest.raises(ValueError, match="cannot filter on 'url'"):
        Filters(ranges=(("url", 0.0, 1.0),))


def test_subset_membership_filter(flat_lake: tuple[Path, dict[int, np.ndarray]], tmp_path: Path) -> None:
    root, vectors = flat_lake
    defn = SubsetDefinition(name="bright", description="test", conditions=(("nice", "aesthetic >= 6.5"),))
    export_subset(str(root), defn)
    clip = table(root, "clip")
    members = {u for u in vectors if clip[u][R.AESTHETIC] >= 6.5}
    gen = Generation.load(str(root))
    for ranked in gen.search(unit_vectors(5, DIM, seed=3), 30, Filters(subset="bright")):
        assert {int(gen.store.uids[r]) for r, _ in ranked} <= members and ranked
    with pytest.raises(ValueError, match="no release"):
        gen.mask(Filters(subset="nonexistent"))


def test_near_duplicate_results_collapse_to_the_best_ranked(tmp_path: Path) -> None:
    x = unit_vectors(400, DIM, seed=2)
    copies = x[:20] + 0.01 * np.random.default_rng(0).normal(size=(20, DIM)).astype(np.float32)
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    write_partition(str(tmp_path), Partition(CRAWL, "000"), np.arange(420, dtype=np.int64) + 1, np.vstack([x, copies]))
    build_index(str(tmp_path), FLAT)
    gen = Generation.load(str(tmp_path))
    [ranked] = gen.search(x[:1], 50)
    rows = [r for r, _ in ranked]
    dropped = gen.near_duplicates(rows)
    uids = [int(gen.store.uids[r]) for r in rows]
    assert uids[0] in (1, 401) and 1 in uids and 401 in uids  # the original and its planted copy
    assert {uids[i] for i in dropped} & {1, 401} and len({1, 401} - {uids[i] for i in dropped}) == 1
    kept = np.stack([x[u - 1] if u <= 400 else copies[u - 401] for i, u in enumerate(uids) if i not in dropped])
    assert (np.triu(kept @ kept.T, k=1) < 0.94).all()


def test_aesthetic_embeddings_are_the_mean_per_rating_and_shift_the_query(
        flat_lake: tuple[Path, dict[int, np.ndarray]]) -> None:
    root, vectors = flat_lake
    gen = Generation.load(str(root))
    clip = table(root, "clip")
    assert gen.aesthetic.shape == (AESTHETIC_RATINGS, DIM)
    for rating in (4, 6):
        members = [vectors[u] for u in vectors if min(9, max(0, round(clip[u][R.AESTHETIC]))) == rating]
        mean = np.mean(members, axis=0)
        np.testing.assert_allclose(gen.aesthetic[rating], mean / np.linalg.norm(mean), atol=1e-5)
    q = unit_vectors(1, DIM, seed=4)
    shifted = gen.shift_by_aesthetic(q, 6, 0.5)
    expected = q + 0.5 * gen.aesthetic[6]
    np.testing.assert_allclose(shifted, expected / np.linalg.norm(expected), atol=1e-6)
    with pytest.raises(ValueError, match="rating 0-9"):
        gen.shift_by_aesthetic(q, 10, 0.5)


def test_engine_picks_up_a_new_generation_and_never_returns_a_removed_uid(tmp_path: Path) -> None:
    make_lake(tmp_path, (800,), seed=9)
    build_index(str(tmp_path), FLAT)
    engine = SearchEngine(str(tmp_path), reload_interval_s=0.0)
    first = engine.current()
    gone = int(first.store.uids[0])
    query = first.store.embeddings(np.array([0]))
    assert int(first.store.uids[first.search(query, 1)[0][0][0]]) == gone
    # The partition is rewritten without that uid (dedupe now calls it a duplicate); the index moves on.
    part = Partition(CRAWL, "000")
    dedupe = pq.read_table(Lake(str(tmp_path)).table("dedupe", part)).to_pylist()
    uids = np.array([r[R.UID] for r in dedupe], dtype=np.int64)
    survivor = np.array([r[R.SURVIVOR] and r[R.UID] != gone for r in dedupe])
    x = unit_vectors(800, DIM, seed=90)
    write_partition(str(tmp_path), part, uids, x, survivor=survivor, seed=90)
    assert build_index(str(tmp_path), FLAT).generation == 2
    second = engine.wait_for_generation(2, timeout_s=30)
    assert engine.reloads == 1 and second.manifest.generation == 2
    assert gone not in set(second.store.uids.tolist())
    for ranked in second.search(np.vstack([query, x[:5]]), 50):
        assert gone not in {int(second.store.uids[r]) for r, _ in ranked}


def test_taken_down_uids_leave_every_search_at_once_and_return_when_lifted(tmp_path: Path) -> None:
    vectors = make_lake(tmp_path, (600, 600), seed=3)
    build_index(str(tmp_path), FLAT)
    gen = Generation.load(str(tmp_path))
    clip = table(tmp_path, "clip")
    queries = unit_vectors(8, DIM, seed=13)
    aesthetic = Filters(ranges=(("aesthetic", 5.0, None),))
    passing = {u for u in vectors if clip[u][R.AESTHETIC] >= 5.0}

    def uids(found: list[list[tuple[int, float]]]) -> list[list[int]]:
        return [[int(gen.store.uids[r]) for r, _ in ranked] for ranked in found]

    plain, filtered = uids(gen.search(queries, 10)), uids(gen.search(queries, 10, aesthetic))  # caches a selector
    assert plain == [brute(vectors, q, 10) for q in queries]
    assert filtered == [brute(vectors, q, 10, passing) for q in queries]
    held = sorted({r[0] for r in plain} | {r[0] for r in filtered} | {plain[0][1]})
    absent = [12345, next(u for u in table(tmp_path, "pairs") if u not in vectors)]  # not in this generation
    take_down(tmp_path, held + absent)  # no rebuild, no reload: the same Generation object

    blocked = gen.taken_down()
    assert blocked.uids.tolist() == held and sorted(gen.store.uids[blocked.rows].tolist()) == held
    assert gen.blocked_uids() == len(held) + 2 and gen.taken_down_by(absent[0]) == "test-list"
    allowed = set(vectors) - set(held)
    assert uids(gen.search(queries, 10)) == [brute(vectors, q, 10, allowed) for q in queries]
    assert uids(gen.search(queries, 10, aesthetic)) == [brute(vectors, q, 10, allowed & passing) for q in queries]
    assert all(len(r) == 10 for r in uids(gen.search(queries, 10)))
    paged = uids(gen.search(queries[:1], 600))[0]  # clip-retrieval's id pages come from the same search
    assert len(paged) == 600 and not set(paged) & set(held)
    mask = gen.mask(Filters())
    assert int(mask.sum()) == len(vectors) - len(held) and not mask[blocked.rows].any()
    assert int(gen.mask(aesthetic).sum()) == len(passing - set(held))
    saved = SavedQuery.from_vector(queries[0], gen.manifest, "image", Filters(), top_k=10)
    assert match_query(str(tmp_path), saved).uids.tolist() == sorted(brute(vectors, queries[0], 10, allowed))

    take_down(tmp_path, absent)  # a list whose uids the generation no longer holds: the plain path again
    assert len(gen.taken_down()) == 0
    assert uids(gen.search(queries, 10)) == plain and uids(gen.search(queries, 10, aesthetic)) == filtered
    take_down(tmp_path, held)
    assert uids(gen.search(queries, 10))[0][0] != plain[0][0]
    Path(blocklist.taken_down_path(str(tmp_path))).unlink()
    assert uids(gen.search(queries, 10)) == plain and uids(gen.search(queries, 10, aesthetic)) == filtered


def test_ivf_search_excludes_taken_down_uids_with_k_hits(tmp_path: Path) -> None:
    vectors = make_lake(tmp_path, (1500, 1500), seed=6)
    assert build_index(str(tmp_path), IVF).family == "ivf_flat"
    gen = Generation.load(str(tmp_path))
    queries = unit_vectors(20, DIM, seed=17)
    before = [[int(gen.store.uids[r]) for r, _ in ranked] for ranked in gen.search(queries, 10)]
    held = sorted({u for ranked in before for u in ranked[:3]})  # each query's three best
    take_down(tmp_path, held)
    recalls = []
    for q, ranked in zip(queries, gen.search(queries, 10), strict=True):
        got = [int(gen.store.uids[r]) for r, _ in ranked]
        assert len(got) == 10 and not set(got) & set(held)
        recalls.append(len(set(got) & set(brute(vectors, q, 10, set(vectors) - set(held)))) / 10)
    assert np.mean(recalls) >= 0.9, np.mean(recalls)
