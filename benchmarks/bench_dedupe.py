"""Benchmark the global dedupe (curation.dedupe) on a synthetic lake: one-shot, incremental add, no-op rerun.

    python benchmarks/bench_dedupe.py [--partitions 8] [--rows 50000] [--radius 4] [--embeddings]
                                      [--dim 64] [--seed 0] [--json OUT]

Data: per partition, `--rows` kept pairs with random pHashes and sha256s, of which ~10% are planted
duplicates of earlier rows (anywhere in the lake): exact copies (same sha256 and pHash), near copies (pHash
1-6 bits away), re-captioned copies (same url and text, hence the same uid, in another partition) and, with
--embeddings, near embeddings (cosine 0.97). It reports:
  one-shot     dedupe_lake over all partitions on a fresh state,
  incremental  dedupe_lake over the first P-1, then over all P (the second call is the time per new partition),
  rerun        the same call again with unchanged inputs (should write nothing),
  equal        the incremental and one-shot dedupe tables are byte-identical,
plus nodes, clusters and duplicates by reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from curation import io  # noqa: E402
from curation import records as R  # noqa: E402
from curation.dedupe import DedupeConfig, DedupeResult, dedupe_lake  # noqa: E402
from curation.layout import Lake, Partition  # noqa: E402


def write_lake(root: Path, parts: list[Partition], rows: int, dim: int, embeddings: bool, seed: int) -> None:
    """Write finished pairs/downloads/clip stages for every partition, with planted duplicates of earlier rows."""
    rng = np.random.default_rng(seed)
    lake = Lake(str(root))
    old_hash, old_uid = np.zeros(0, np.uint64), np.zeros(0, np.int64)
    old_sha = np.zeros(0, dtype=object)
    old_emb = np.zeros((0, dim), np.float32)
    for p, part in enumerate(parts):
        uid = rng.integers(-(2**63), 2**63 - 1, rows, dtype=np.int64)
        phash = rng.integers(0, 2**64, rows, dtype=np.uint64)
        sha = np.array([hashlib.sha256(f"{seed}/{p}/{i}".encode()).hexdigest() for i in range(rows)], dtype=object)
        emb = _unit(rng.standard_normal((rows, dim)).astype(np.float32))
        if len(old_hash):
            kind = rng.integers(0, 40, rows)  # 0: exact copy, 1: near pHash, 2: same (url, text), 3: near embedding
            src = rng.integers(0, len(old_hash), rows)
            exact, near, same_pair, close = (kind == k for k in range(4))
            phash[exact], sha[exact] = old_hash[src[exact]], old_sha[src[exact]]
            flips = rng.integers(1, 7, int(near.sum()))
            noise = np.zeros(len(flips), dtype=np.uint64)
            for k in range(6):
                bit = np.uint64(1) << rng.integers(0, 64, len(flips)).astype(np.uint64)
                noise |= np.where(flips > k, bit, np.uint64(0))
            phash[near] = old_hash[src[near]] ^ noise
            uid[same_pair] = old_uid[src[same_pair]]
            if embeddings:
                other = _unit(rng.standard_normal((int(close.sum()), dim)).astype(np.float32))
                emb[close] = _unit(0.97 * old_emb[src[close]] + 0.25 * other)
        uid = _unique(uid, rng)
        old_hash, old_uid = np.concatenate([old_hash, phash]), np.concatenate([old_uid, uid])
        old_sha, old_emb = np.concatenate([old_sha, sha]), np.concatenate([old_emb, emb])
        n = rows
        # url and text follow from the uid, so a planted uid repeats its (url, text) as LAION's hash implies.
        tables = {
            "pairs": pa.table({R.UID: uid, R.URL: [f"http://img.test/{u}.jpg" for u in uid.tolist()],
                               R.TEXT: [f"caption {u}" for u in uid.tolist()]}),
            "downloads": pa.table({
                R.UID: uid, R.STATUS: [R.STATUS_SUCCESS] * n, R.SHA256: sha.tolist(),
                R.ORIGINAL_WIDTH: pa.array(rng.integers(64, 2048, n), pa.int32()),
                R.ORIGINAL_HEIGHT: pa.array(rng.integers(64, 2048, n), pa.int32()),
                R.SHARD: [f"{i // 10000:05d}" for i in range(n)], R.KEY: [f"{i:09d}" for i in range(n)]}),
            "clip": pa.table({
                R.UID: uid, R.SIMILARITY: pa.array(rng.uniform(0.28, 0.4, n).astype(np.float32)),
                R.KEEP: [True] * n, R.STATUS: [R.STATUS_OK] * n, "phash": phash.view(np.int64)}),
        }
        for stage, table in tables.items():
            io.write_parquet(table, lake.table(stage, part))
        emb_dir = Path(lake.embeddings_dir(part))
        emb_dir.mkdir(parents=True, exist_ok=True)
        np.save(emb_dir / "img_emb.npy", emb.astype(np.float16))
        np.save(emb_dir / "uids.npy", uid)
        for stage in tables:
            io.write_marker(lake.partition_dir(stage, part), {"rows": n})


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _unique(uid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Replace repeated uids inside one partition by fresh random ones (pairs are unique per partition)."""
    _, first = np.unique(uid, return_index=True)
    dup = np.setdiff1d(np.arange(len(uid)), first)
    uid[dup] = rng.integers(-(2**63), 2**63 - 1, len(dup), dtype=np.int64)
    return uid


def timed(root: Path, parts: list[Partition], config: DedupeConfig) -> tuple[float, DedupeResult]:
    start = time.perf_counter()
    result = dedupe_lake(str(root), parts, config)
    return time.perf_counter() - start, result


def tables(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "dedupe").glob("crawl=*/**/*.parquet"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--radius", type=int, default=4)
    ap.add_argument("--embeddings", action="store_true")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    parts = [Partition(f"CC-MAIN-2024-{10 + i // 4:02d}", f"{i % 4:03d}") for i in range(args.partitions)]
    config = DedupeConfig(radius=args.radius, use_embeddings=args.embeddings)
    with tempfile.TemporaryDirectory() as tmp:
        inc, once = Path(tmp) / "inc", Path(tmp) / "once"
        t0 = time.perf_counter()
        write_lake(inc, parts, args.rows, args.dim, args.embeddings, args.seed)
        write_s = time.perf_counter() - t0
        shutil.copytree(inc, once)
        one_shot_s, one = timed(once, parts, config)
        base_s, _ = timed(inc, parts[:-1], config)
        add_s, added = timed(inc, parts, config)
        rerun_s, rerun = timed(inc, parts, config)
        report: dict[str, Any] = {
            "partitions": args.partitions, "rows_per_partition": args.rows, "radius": args.radius,
            "embeddings": args.embeddings, "write_lake_s": round(write_s, 2),
            "one_shot_s": round(one_shot_s, 2), "first_p_minus_1_s": round(base_s, 2),
            "add_one_partition_s": round(add_s, 2), "rerun_s": round(rerun_s, 2),
            "rerun_rewrote": list(rerun.partitions_rewritten),
            "add_searched_phash_values": added.phash_values_searched,
            "equal": tables(inc) == tables(once),
            "nodes": one.nodes, "clusters": one.clusters, "duplicates_removed": one.duplicates_removed,
            "by_reason": one.by_reason, "edges_by_layer": one.edges_by_layer,
            "largest_cluster": max(one.cluster_sizes),
        }
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
