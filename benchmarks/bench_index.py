"""Benchmark the index build (curation.index) against autofaiss on the same vectors, side by side in one run.

    python benchmarks/bench_index.py [--n 1000000] [--dim 512] [--partitions 10] [--budget-gb 4]
                                     [--queries 1000] [--no-autofaiss] [--json OUT]

Data: `--n` L2-normalised vectors around n/50 random centres (cosine ~0.8 to their centre: a vector's nearest
neighbours are its centre's other members, the way CLIP embeddings of one kind of picture gather), stored
as float16 the way the CLIP pass writes them, in a synthetic lake of `--partitions` partitions whose every
row survives dedupe. autofaiss gets the very same vectors (as float32 .npy, the values ours reads after its
float16 -> float32 cast) with the same memory budget, metric "ip" and a 10 ms query-time target.

autofaiss 2.18 pins numpy < 2, which the project cannot install, so it runs in its own environment
(`.cache/autofaiss-venv`, built on first use with uv from the package registry) as a child process; so does
our build, and each child prints its own peak RSS (VmHWM). Then both indexes are loaded here and measured
with the same `--queries` held-out queries (fresh vectors from the same distribution): recall@10 against
exact search, and single-query latency p50/p99 with one search per call (faiss threads as configured).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import faiss  # noqa: E402

from curation import records as R  # noqa: E402
from curation.index import recall_at_k  # noqa: E402
from curation.io import write_marker  # noqa: E402
from curation.layout import Lake, Partition  # noqa: E402

AUTOFAISS_VENV = REPO / ".cache" / "autofaiss-venv"
AUTOFAISS_REQS = ("autofaiss==2.18.0", "faiss-cpu==1.7.4", "numpy<2", "pyarrow<16")
POINTS_PER_CENTRE = 50


def vectors(n: int, dim: int, seed: int, centre_count: int) -> np.ndarray:
    """Unit vectors near random unit centres, rounded through float16 as the CLIP pass stores them."""
    centres = np.random.default_rng(1234).standard_normal((centre_count, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for i in range(0, n, 100_000):
        m = min(100_000, n - i)
        noise = rng.standard_normal((m, dim)).astype(np.float32) / np.sqrt(dim)
        x = centres[rng.integers(0, centre_count, m)] + 0.7 * noise
        out[i:i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out.astype(np.float16).astype(np.float32)


def write_lake(root: Path, x: np.ndarray, partitions: int) -> None:
    lake = Lake(str(root))
    bounds = np.linspace(0, len(x), partitions + 1).astype(int)
    for p in range(partitions):
        part = Partition("CC-BENCH", f"{p:03d}")
        sl = slice(bounds[p], bounds[p + 1])
        uids = np.arange(bounds[p], bounds[p + 1], dtype=np.int64)
        emb = Path(lake.embeddings_dir(part))
        emb.mkdir(parents=True)
        np.save(emb / "uids.npy", uids)
        np.save(emb / "img_emb.npy", x[sl].astype(np.float16))
        n = len(uids)
        pq.write_table(pa.table({R.UID: uids, R.KEEP: np.ones(n, bool), "clip_model": ["bench"] * n,
                                 "clip_checkpoint": ["random"] * n}), lake.table("clip", part))
        write_marker(lake.partition_dir("clip", part), {"rows": n})
        Path(lake.partition_dir("dedupe", part)).mkdir(parents=True)
        pq.write_table(pa.table({R.UID: uids, "survivor": np.ones(n, bool)}), lake.table("dedupe", part))
        write_marker(lake.partition_dir("dedupe", part), {"rows": n})


HWM = """
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print("PEAK_RSS_KB", line.split()[1])
"""


def run_child(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of a child process. The peak is the child's own VmHWM, printed by
    the child at its end: a forked child's rusage maxrss also counts the parent's pages from before exec."""
    start = time.perf_counter()
    run = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({run.returncode}):\n{run.stdout[-3000:]}")
    peak_kb = int(run.stdout.split("PEAK_RSS_KB ", 1)[1].split()[0])
    return seconds, peak_kb / 1024, run.stdout


OURS = """
import json, sys
sys.path.insert(0, {repo!r})
from curation.index import IndexConfig, build_index
r = build_index({lake!r}, IndexConfig(memory_budget_bytes={budget}, eval_queries=500))
print("RESULT " + json.dumps({{"factory": r.factory, "nprobe": r.nprobe, "recall_self": r.recall_at_k,
                               "index_bytes": r.index_bytes}}))
""" + HWM

AUTOFAISS = """
import json
from autofaiss import build_index
_, infos = build_index(embeddings={emb!r}, index_path={out!r}, index_infos_path={infos!r},
                       max_index_memory_usage="{budget_g}G", current_memory_available="16G", metric_type="ip",
                       max_index_query_time_ms=10, min_nearest_neighbors_to_retrieve=10, verbose=40)
print("RESULT " + json.dumps({{"index_key": json.load(open({infos!r})).get("index_key")}}))
""" + HWM


def ensure_autofaiss() -> Path:
    python = AUTOFAISS_VENV / "bin" / "python"
    if python.exists():
        return python
    uv = shutil.which("uv") or str(Path.home() / ".local/bin/uv")
    subprocess.run([uv, "venv", "--python", sys.executable, str(AUTOFAISS_VENV)], check=True)
    subprocess.run([uv, "pip", "install", "--python", str(python), *AUTOFAISS_REQS], check=True)
    return python


def measure(index: faiss.Index, queries: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    _, found = index.search(queries, 10)
    times = []
    for q in queries:
        t = time.perf_counter()
        index.search(q[None, :], 10)
        times.append((time.perf_counter() - t) * 1000)
    return {"recall_at_10": round(recall_at_k(found, truth), 4), "p50_ms": round(float(np.percentile(times, 50)), 3),
            "p99_ms": round(float(np.percentile(times, 99)), 3)}


def exact(x: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    return flat.search(queries, k)[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--partitions", type=int, default=10)
    ap.add_argument("--budget-gb", type=float, default=4.0)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--no-autofaiss", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-index-"))
    report: dict[str, Any] = {"n": args.n, "dim": args.dim, "budget_gb": args.budget_gb, "queries": args.queries,
                              "threads": faiss.omp_get_max_threads()}
    try:
        centres = max(100, args.n // POINTS_PER_CENTRE)
        x = vectors(args.n, args.dim, seed=0, centre_count=centres)
        queries = vectors(args.queries, args.dim, seed=1, centre_count=centres)
        write_lake(work / "lake", x, args.partitions)
        truth = exact(x, queries)
        budget = int(args.budget_gb * 2**30)
        secs, rss, out = run_child([sys.executable, "-c", OURS.format(repo=str(REPO), lake=str(work / "lake"),
                                                                      budget=budget)])
        info = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
        from curation.index import load_index

        ours = load_index(str(work / "lake"))
        report["ours"] = {**info, "build_s": round(secs, 1), "peak_rss_mib": round(rss), **measure(
            ours.index, queries, truth)}  # uids are row numbers, the ids autofaiss gives
        print("ours     ", json.dumps(report["ours"]), flush=True)
        del ours
        if not args.no_autofaiss:
            python = ensure_autofaiss()
            emb = work / "af-emb"
            emb.mkdir()
            np.save(emb / "emb.npy", x)
            del x
            out_path, infos = work / "af.index", work / "af-infos.json"
            secs, rss, out = run_child([str(python), "-c", AUTOFAISS.format(
                emb=str(emb), out=str(out_path), infos=str(infos), budget_g=args.budget_gb)])
            af_info = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
            af = faiss.read_index(str(out_path))
            params = json.loads(infos.read_text()).get("index_param")
            if params:
                faiss.ParameterSpace().set_index_parameters(af, params)
            report["autofaiss"] = {**af_info, "index_param": params, "build_s": round(secs, 1),
                                   "peak_rss_mib": round(rss), "index_bytes": out_path.stat().st_size,
                                   **measure(af, queries, truth)}
            print("autofaiss", json.dumps(report["autofaiss"]), flush=True)
            report["build_time_ratio_ours_over_autofaiss"] = round(
                report["ours"]["build_s"] / report["autofaiss"]["build_s"], 3)
            print("build time ours / autofaiss:", report["build_time_ratio_ours_over_autofaiss"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
