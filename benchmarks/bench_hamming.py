"""Benchmark the exact Hamming-radius self-join (curation.hamming) on 1M hashes, against faiss and brute force.

    python benchmarks/bench_hamming.py [--n 1000000] [--radius 6] [--exact-n 20000] [--faiss-n 100000]
                                       [--blocks B] [--seed 0] [--json OUT]

Data: mostly uniform random 64-bit hashes plus planted near-duplicate clusters (a centre and copies of it with
0-8 random bit flips, so some members fall inside the radius and some outside) and groups of exact copies.
It reports, in one run:
  ours        curation.hamming.pairs_within on all N: seconds, peak memory (RSS growth and the largest numpy
              allocation, via tracemalloc), pairs found, and the block plan it chose,
  complete    every within-radius pair inside the planted clusters (found by brute force per cluster) is in
              the result, and every reported pair really is within the radius,
  exact       on the first --exact-n hashes: ours equals chunked numpy brute force (np.bitwise_count),
  faiss       faiss IndexBinaryMultiHash (4 tables of 16 bits, 1 flip: exact for radius <= 7) range search on
              the first --faiss-n hashes, against ours on the same subset (time and equality).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from curation.hamming import pairs_within, plan_blocks  # noqa: E402


def planted_hashes(n: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """N hashes, ~10% of them in near-duplicate clusters or exact-copy groups; plus each cluster's positions."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, n, dtype=np.uint64)
    clusters: list[np.ndarray] = []
    slots = rng.permutation(n)
    used = 0
    while used < n // 10:
        size = int(rng.integers(2, 12))
        members = slots[used : used + size]
        used += size
        centre = hashes[members[0]]
        flips = rng.integers(0, 9, size)  # bit flips per member, 0..8
        for m, k in zip(members, flips, strict=True):
            noise = np.uint64(0)
            for bit in rng.choice(64, int(k), replace=False):
                noise |= np.uint64(1) << np.uint64(bit)
            hashes[m] = centre ^ noise
        clusters.append(members)
    return hashes, clusters


def brute_pairs(hashes: np.ndarray, radius: int, chunk: int = 1024) -> np.ndarray:
    """Reference self-join: all i < j within radius, by chunked popcount over the full triangle."""
    out = []
    for lo in range(0, len(hashes), chunk):
        block = hashes[lo : lo + chunk]
        dist = np.bitwise_count(block[:, None] ^ hashes[None, lo:])
        i, j = np.nonzero(dist <= radius)
        keep = i < j  # the block's own square: j runs from lo, so j > i there means a later hash
        out.append(np.stack([i[keep] + lo, j[keep] + lo], axis=1))
    pairs = np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))].astype(np.int64)


def faiss_pairs(hashes: np.ndarray, radius: int) -> np.ndarray:
    import faiss

    codes = np.ascontiguousarray(hashes.view(np.uint8).reshape(-1, 8))  # any fixed bit order keeps distances
    index = faiss.IndexBinaryMultiHash(64, 4, 16)
    index.nflip = 1  # 4 tables x (1 + 1 flips) > 7: pigeonhole makes it exact up to radius 7
    index.add(codes)
    lims, _, ids = index.range_search(codes, radius + 1)  # faiss keeps distances < radius
    bounds = np.asarray(lims, dtype=np.int64)
    query = np.repeat(np.arange(len(hashes)), bounds[1:] - bounds[:-1])
    keep = query < ids
    pairs = np.stack([query[keep], ids[keep]], axis=1).astype(np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--radius", type=int, default=6)
    parser.add_argument("--exact-n", type=int, default=20_000, help="subset checked against brute force")
    parser.add_argument("--faiss-n", type=int, default=100_000, help="subset timed with faiss (0: skip)")
    parser.add_argument("--blocks", type=int, default=None, help="force the block plan (default: cost model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    r = args.radius

    hashes, clusters = planted_hashes(args.n, args.seed)
    plan = plan_blocks(len(np.unique(hashes)), len(np.unique(hashes)), r, self_join=True, blocks=args.blocks)
    rss_before = rss_mib()
    tracemalloc.start()
    t0 = time.perf_counter()
    pairs = pairs_within(hashes, r) if args.blocks is None else _forced(hashes, r, args.blocks)
    ours_s = time.perf_counter() - t0
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_growth = rss_mib() - rss_before

    # Completeness on the planted truth, soundness on everything reported.
    truth = [brute_pairs(hashes[m], r) for m in clusters]
    expected = {
        (min(int(m[a]), int(m[b])), max(int(m[a]), int(m[b])))
        for m, t in zip(clusters, truth, strict=True)
        for a, b in t
    }
    found = {(int(a), int(b)) for a, b in pairs}
    missing = len(expected - found)
    sound = bool((np.bitwise_count(hashes[pairs[:, 0]] ^ hashes[pairs[:, 1]]) <= r).all()) and bool(
        (pairs[:, 0] < pairs[:, 1]).all()
    )

    sub = hashes[: args.exact_n]
    t0 = time.perf_counter()
    brute = brute_pairs(sub, r)
    brute_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours_sub = pairs_within(sub, r)
    ours_sub_s = time.perf_counter() - t0
    exact = bool(np.array_equal(ours_sub, brute))

    faiss_row: dict[str, Any] | None = None
    if args.faiss_n and r <= 7:
        fsub = hashes[: args.faiss_n]
        t0 = time.perf_counter()
        fp = faiss_pairs(fsub, r)
        faiss_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        op = pairs_within(fsub, r)
        ours_f_s = time.perf_counter() - t0
        faiss_row = {"n": len(fsub), "faiss_s": faiss_s, "ours_s": ours_f_s, "equal": bool(np.array_equal(fp, op))}

    print(f"{args.n} hashes, radius {r}, plan: {plan.blocks} blocks, {plan.agree} must agree, {plan.tables} tables")
    print(f"{'check':<34}{'value':>16}")
    rows = [
        ("ours self-join seconds", f"{ours_s:.2f}"),
        ("pairs found", f"{len(pairs)}"),
        ("peak RSS growth MiB", f"{rss_growth:.0f}"),
        ("peak traced numpy MiB", f"{traced_peak / 2**20:.0f}"),
        ("planted pairs missing", f"{missing} of {len(expected)}"),
        ("reported pairs all within radius", f"{sound}"),
        (f"equals brute force on {len(sub)}", f"{exact}"),
        ("  brute force / ours seconds", f"{brute_s:.2f} / {ours_sub_s:.2f}"),
    ]
    if faiss_row:
        rows += [
            (f"faiss MultiHash on {faiss_row['n']} seconds", f"{faiss_row['faiss_s']:.2f}"),
            (f"ours on {faiss_row['n']} seconds", f"{faiss_row['ours_s']:.2f}"),
            ("faiss equals ours", f"{faiss_row['equal']}"),
        ]
    for name, value in rows:
        print(f"{name:<34}{value:>16}")
    result = {
        "bench": "hamming",
        "n": args.n,
        "radius": r,
        "blocks": plan.blocks,
        "tables": plan.tables,
        "ours_s": ours_s,
        "pairs": len(pairs),
        "rss_growth_mib": rss_growth,
        "traced_peak_mib": traced_peak / 2**20,
        "planted_pairs": len(expected),
        "planted_missing": missing,
        "sound": sound,
        "exact_n": len(sub),
        "exact": exact,
        "brute_s": brute_s,
        "faiss": faiss_row,
    }
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if exact and sound and missing == 0 else 1


def _forced(hashes: np.ndarray, radius: int, blocks: int) -> np.ndarray:
    from curation.hamming import join_within

    i, j, _ = join_within(hashes, None, radius, blocks=blocks)
    pairs = np.stack([i, j], axis=1)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


if __name__ == "__main__":
    sys.exit(main())
