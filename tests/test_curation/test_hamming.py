"""Exact Hamming-radius search: multi-index hashing against brute force, ids, incremental adds, plans."""

from __future__ import annotations

import numpy as np
import pytest

from curation.hamming import BITS, HammingIndex, join_within, pairs_within, plan_blocks


def brute_pairs(hashes: np.ndarray, radius: int) -> np.ndarray:
    dist = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    i, j = np.nonzero(np.triu(dist <= radius, k=1))
    return np.stack([i, j], axis=1).astype(np.int64)


def flip_bits(rng: np.random.Generator, h: np.uint64, k: int) -> np.uint64:
    for bit in rng.choice(BITS, k, replace=False):
        h ^= np.uint64(1) << np.uint64(bit)
    return h


def planted(n_random: int, n_clusters: int, seed: int) -> np.ndarray:
    """Random hashes, clusters of copies 0-9 bits away from a centre, and groups of exact copies, shuffled."""
    rng = np.random.default_rng(seed)
    parts = [rng.integers(0, 2**64, n_random, dtype=np.uint64)]
    for c in rng.integers(0, 2**64, n_clusters, dtype=np.uint64):
        parts.append(np.array([flip_bits(rng, c, int(k)) for k in rng.integers(0, 10, rng.integers(2, 8))]))
        if rng.random() < 0.2:
            parts.append(np.full(int(rng.integers(2, 6)), c, dtype=np.uint64))
    hashes = np.concatenate(parts)
    rng.shuffle(hashes)
    return hashes


HASHES = planted(1500, 150, seed=1)


@pytest.mark.parametrize("radius", range(9))
def test_pairs_within_equals_brute_force(radius: int) -> None:
    expected = brute_pairs(HASHES, radius)
    assert len(expected) > 20  # the planted clusters really produce pairs at every radius
    np.testing.assert_array_equal(pairs_within(HASHES, radius), expected)
    # Every plan must be exact, not only the one the cost model picks for this size.
    for blocks in sorted({radius + 1, radius + 2, radius + 4, 0}):
        i, j, d = join_within(HASHES, None, radius, blocks=blocks, max_candidates=97)
        got = np.stack([i, j], axis=1)
        got = got[np.lexsort((got[:, 1], got[:, 0]))]
        np.testing.assert_array_equal(got, expected, err_msg=f"blocks={blocks}")
        np.testing.assert_array_equal(np.sort(d), np.sort(np.bitwise_count(HASHES[i] ^ HASHES[j])))


def test_pairs_within_edge_cases() -> None:
    assert pairs_within(np.zeros(0, dtype=np.uint64), 3).shape == (0, 2)
    assert pairs_within(np.array([5], dtype=np.uint64), 3).shape == (0, 2)
    same = np.array([7, 7, 7], dtype=np.uint64)
    np.testing.assert_array_equal(pairs_within(same, 0), [[0, 1], [0, 2], [1, 2]])
    extremes = np.array([0, 2**64 - 1], dtype=np.uint64)
    assert len(pairs_within(extremes, 63)) == 0
    np.testing.assert_array_equal(pairs_within(extremes, 64), [[0, 1]])
    small = HASHES[:200]
    assert len(pairs_within(small, 64)) == 200 * 199 // 2
    with pytest.raises(ValueError, match="radius"):
        pairs_within(small, 65)
    with pytest.raises(ValueError, match="radius"):
        pairs_within(small, -1)
    with pytest.raises(TypeError):
        pairs_within(small.astype(np.float64), 2)
    # int64, as parquet and DuckDB store hashes, is the same 64 bits.
    np.testing.assert_array_equal(pairs_within(HASHES.view(np.int64), 5), brute_pairs(HASHES, 5))


def test_search_equals_brute_force_and_keeps_ids() -> None:
    rng = np.random.default_rng(2)
    indexed = HASHES[:1200]
    ids = rng.choice(10**12, 1200, replace=False).astype(np.int64) - 5 * 10**11  # arbitrary, some negative
    queries = np.concatenate([HASHES[1200:], indexed[:50]])  # some queries are indexed hashes themselves
    index = HammingIndex(indexed, ids)
    for radius in (0, 3, 7):
        matches = index.search(queries, radius)
        dist = np.bitwise_count(queries[:, None] ^ indexed[None, :])
        q, k = np.nonzero(dist <= radius)
        order = np.lexsort((ids[k], q))
        np.testing.assert_array_equal(matches.query, q[order])
        np.testing.assert_array_equal(matches.ids, ids[k][order])
        np.testing.assert_array_equal(matches.distance, dist[q, k][order])
        assert len(matches) >= 50  # the self-queries at least
    grouped = list(index.search(queries, 2).per_query())
    assert [g[0] for g in grouped] == sorted({g[0] for g in grouped})
    assert all(len(found) == len(d) > 0 for _, found, d in grouped)


def test_incremental_add_equals_one_shot_build() -> None:
    ids = np.arange(len(HASHES), dtype=np.int64) * 3 + 11
    one_shot = HammingIndex(HASHES, ids)
    incremental = HammingIndex()
    for lo, hi in ((0, 1), (1, 700), (700, 700), (700, len(HASHES))):
        incremental.add(HASHES[lo:hi], ids[lo:hi])
    assert len(incremental) == len(one_shot) == len(HASHES)
    rng = np.random.default_rng(3)
    sources = HASHES[::9]
    queries = np.array(
        [flip_bits(rng, h, int(k)) for h, k in zip(sources, rng.integers(0, 8, len(sources)), strict=True)]
    )
    a, b = one_shot.search(queries, 5), incremental.search(queries, 5)
    assert len(a) > 100
    for field in ("query", "ids", "distance"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    np.testing.assert_array_equal(one_shot.pairs_within(4), incremental.pairs_within(4))


def test_index_self_join_reports_ids_and_default_ids_continue() -> None:
    index = HammingIndex()
    index.add(HASHES[:800])
    index.add(HASHES[800:])
    np.testing.assert_array_equal(index.ids, np.arange(len(HASHES)))
    np.testing.assert_array_equal(index.pairs_within(3), brute_pairs(HASHES, 3))
    labelled = HammingIndex(HASHES, np.arange(len(HASHES)) + 1000)
    np.testing.assert_array_equal(labelled.pairs_within(3), brute_pairs(HASHES, 3) + 1000)
    with pytest.raises(ValueError, match="ids"):
        index.add(HASHES[:3], [1, 2])


def test_plan_uses_tables_at_scale_and_brute_force_when_cheaper() -> None:
    big = plan_blocks(10**6, 10**6, 6, self_join=True)
    assert not big.brute_force and big.blocks - big.agree == 6
    assert big.agree > 1  # the textbook r+1 split would put ~1e9 random pairs in each of its tables
    assert plan_blocks(50, 50, 6, self_join=True).brute_force
    assert plan_blocks(10**6, 10**6, 0, self_join=True).tables == 1
    with pytest.raises(ValueError, match="blocks"):
        plan_blocks(100, 100, 6, self_join=True, blocks=6)
