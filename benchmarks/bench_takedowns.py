"""Benchmark takedown matching and propagation on a synthetic lake, side by side with plain scans in one run.

    python benchmarks/bench_takedowns.py [--rows 1000000] [--partitions 10] [--workdir DIR] [--json OUT]

The lake (curation.sample.lake: every stage's table, 64-d embeddings, no shard tars) gets one list of realistic
shape: 10,000 image sha256 (1,000 of them in the lake), 1,000 md5 (none in the lake, which predates md5), 1,000 URLs
(100 in the lake), 1,000 pHashes at radius 4 (100 near a lake image), 3 hosts and 5 caption keywords with a
punsafe floor (two, `caption 1` and `caption 9`, whose words are in most captions: the prefilter's worst case).
Measured:

- `match_lake` (every entry against every row, nothing fetched) against the baseline of reading the same columns
  with pyarrow (what any matcher must at least do): seconds and the ratio;
- the crawl-time checks per pair and per image (`CrawlBlocklist.refuse_pair` / `refuse_image`) with that list;
- `propagate` (tables emptied, embeddings zeroed, dedupe state absent here, the index rebuilt without the hits)
  against a baseline rewrite of the same partitions' tables.
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
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from curation import blocklist as B  # noqa: E402
from curation import io  # noqa: E402
from curation import records as R  # noqa: E402
from curation.index import IndexConfig, build_index  # noqa: E402
from curation.layout import Lake, Partition  # noqa: E402
from curation.sample.lake import unit_vectors, write_partition  # noqa: E402
from curation.takedowns import ingest, match_lake, propagate  # noqa: E402

CRAWL = "CC-BENCH-2030-01"


def build_lake(root: Path, rows: int, partitions: int) -> list[Partition]:
    per = rows // partitions
    parts = []
    for p in range(partitions):
        part = Partition(CRAWL, f"{p:03d}")
        uids = np.arange(p * per, (p + 1) * per, dtype=np.int64) * 7919 + 11
        write_partition(str(root), part, uids, unit_vectors(per, 64, seed=p), seed=p)
        parts.append(part)
    build_index(str(root), IndexConfig(flat_max_vectors=rows + 1))
    return parts


def the_list(root: Path, rng: np.random.Generator) -> bytes:
    lake = Lake(str(root))
    parts = io.finished_partitions(lake.stage_dir("pairs"))
    pairs = pq.read_table(lake.table("pairs", parts[0]), columns=[R.URL]).column(R.URL).to_pylist()
    downloads = pq.read_table(lake.table("downloads", parts[-1]), columns=[R.SHA256]).column(R.SHA256).to_pylist()
    clip = pq.read_table(lake.table("clip", parts[len(parts) // 2]), columns=[R.PHASH]).column(R.PHASH).to_numpy()
    lines = ["# reason: benchmark"]
    lines += [f"image_sha256 {s}" for s in rng.choice(downloads, 1000, replace=False)]
    lines += [f"image_sha256 {hashlib.sha256(str(i).encode()).hexdigest()}" for i in range(9000)]
    lines += [f"image_md5 {hashlib.md5(str(i).encode()).hexdigest()}" for i in range(1000)]
    lines += [f"url {u}" for u in rng.choice(pairs, 100, replace=False)]
    lines += [f"url https://elsewhere.example.net/{i}.jpg" for i in range(900)]
    near = clip[rng.choice(len(clip), 100, replace=False)].view(np.uint64) ^ np.uint64(0b1011)  # 3 bits away
    far = rng.integers(0, 2**63, 900, dtype=np.int64).view(np.uint64)
    lines += [f"phash {int(h):016x} radius=4" for h in np.concatenate([near, far])]
    lines += ["host img3.example.com", "host nowhere.example.org", "host cdn.example.invalid"]
    lines += [f"caption_keyword caption {w} min_punsafe=0.2" for w in (4242, 31337, 77777, 1, 9)]
    return "\n".join(lines).encode()


def scan_baseline(root: Path) -> float:
    lake = Lake(str(root))
    started = time.perf_counter()
    for part in io.finished_partitions(lake.stage_dir("pairs")):
        pq.read_table(lake.table("pairs", part), columns=[R.UID, R.URL, R.TEXT]).to_pylist()
        pq.read_table(lake.table("downloads", part), columns=[R.UID, R.SHA256, R.FINAL_URL]).to_pylist()
        pq.read_table(lake.table("clip", part), columns=[R.UID, R.PHASH, R.PUNSAFE]).to_pylist()
    return time.perf_counter() - started


def rewrite_baseline(root: Path, parts: list[Partition]) -> float:
    lake = Lake(str(root))
    started = time.perf_counter()
    for part in parts:
        for stage in ("pairs", "downloads", "clip"):
            io.write_parquet(pq.read_table(lake.table(stage, part)), lake.table(stage, part) + ".copy")
    return time.perf_counter() - started


def crawl_checks(root: Path) -> dict[str, float]:
    blocked = B.crawl_blocklist(str(root))
    rng = np.random.default_rng(1)
    urls = [f"https://img{i % 97}.example.com/000/{i:08x}.jpg" for i in range(20_000)]
    started = time.perf_counter()
    for i, url in enumerate(urls):
        blocked.refuse_pair(i, url, f"synthetic caption {i}")
    pair_us = (time.perf_counter() - started) / len(urls) * 1e6
    shas = [hashlib.sha256(str(i).encode()).hexdigest() + "x" for i in range(2000)]
    hashes = rng.integers(-(2**63), 2**63 - 1, 2000, dtype=np.int64)
    started = time.perf_counter()
    for sha, h in zip(shas, hashes.tolist(), strict=True):
        blocked.refuse_image(sha256=sha, md5=sha[:32], phash=h)
    image_us = (time.perf_counter() - started) / len(shas) * 1e6
    return {"refuse_pair_us": round(pair_us, 1), "refuse_image_us": round(image_us, 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--partitions", type=int, default=10)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-takedowns-"))
    root = work / "lake"
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    parts = build_lake(root, args.rows, args.partitions)
    print(f"lake: {args.rows:,} rows in {args.partitions} partitions, built in {time.perf_counter() - started:.0f} s")
    data = the_list(root, np.random.default_rng(0))

    scan_s = scan_baseline(root)
    started = time.perf_counter()
    ingested = ingest(str(root), data, name="bench", reason=None, source="bench.txt")
    ingest_s = time.perf_counter() - started
    rematch_s = match_lake(str(root)).seconds  # nothing new: the cost of re-checking the whole lake
    checks = crawl_checks(root)
    rewrite_s = rewrite_baseline(root, parts)
    result = propagate(str(root))
    out = {
        "rows": args.rows, "entries": ingested.record.entries, "entries_by_kind": ingested.record.by_kind,
        "matched": sum(ingested.matched.values()), "matched_by_kind": ingested.matched,
        "ingest_and_match_s": round(ingest_s, 2), "match_s": round(ingested.match_seconds, 2),
        "rematch_s": round(rematch_s, 2), "scan_baseline_s": round(scan_s, 2),
        "match_over_scan": round(ingested.match_seconds / scan_s, 2),
        "match_rows_per_s": round(args.rows / ingested.match_seconds),
        **checks,
        "propagate_s": round(result.seconds, 2), "rewrite_baseline_s": round(rewrite_s, 2),
        "propagate_over_rewrite": round(result.seconds / rewrite_s, 2), "propagate_steps": result.timings,
        "index_removed": result.index_removed, "rows_emptied": dict(result.scrub.rows),
        "embedding_rows_zeroed": result.scrub.embedding_rows,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
