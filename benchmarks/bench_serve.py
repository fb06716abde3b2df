"""Benchmark the search service (`curation serve`) over HTTP at two lake sizes, side by side in one run.

    python benchmarks/bench_serve.py [--sizes 10000,1000000] [--dim 512] [--queries 400] [--k 40]
                                     [--clients 4] [--workdir DIR] [--json OUT]

For each size a synthetic lake (curation.sample.lake: every stage's table with plausible scores, 100k rows per
partition, clustered unit vectors) is indexed with the index asset's own build (`build_index`, default config),
then `curation serve` runs as a child process and is queried the way clip-retrieval's clients do: POST
/knn-service with `embedding_input` (held-out vectors), `num_images` = k, metadata included, over one keep-alive
connection (latency p50/p99, sequential QPS) and over `--clients` connections at once (QPS). Each is measured
unfiltered and with a ~10 %-selective filter (`min_aesthetic` at the lake's 90th percentile); every filtered hit
is checked against the filter and its recall@k against exact search over the passing rows is reported.

Baselines in the same run: the same searches in process (Generation.search + describe, no HTTP/JSON), and the
hits' metadata read from the uid-keyed metastore against DuckDB over the lake's parquet (how `curation index
search` read it before the metastore). Targets (issue 15): p99 <= 25 ms unfiltered and <= 50 ms filtered at 1M,
1M within 2x of 10k. Lakes are kept under --workdir and reused when their index is already built.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from curation import records as R  # noqa: E402
from curation.index import IndexConfig, Manifest, build_index, recall_at_k  # noqa: E402
from curation.layout import Lake, Partition  # noqa: E402
from curation.sample.lake import unit_vectors, write_partition  # noqa: E402
from curation.search import Filters, Generation, hits  # noqa: E402

ROWS_PER_PARTITION = 100_000
WARMUP = 20


def make_lake(root: Path, n: int, dim: int) -> float:
    """A synthetic lake of n rows, indexed; returns the index build seconds (0 when reused)."""
    if Manifest.load(str(root), "image") is not None:
        return 0.0
    for p, start in enumerate(range(0, n, ROWS_PER_PARTITION)):
        m = min(ROWS_PER_PARTITION, n - start)
        x = unit_vectors(m, dim, seed=100 + p)
        write_partition(str(root), Partition("CC-BENCH", f"{p:03d}"), np.arange(start, start + m), x, seed=p)
    started = time.perf_counter()
    build_index(str(root), IndexConfig())
    return time.perf_counter() - started


class Service:
    """`curation serve LAKE` as a child process on a free loopback port."""

    def __init__(self, lake: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "curation.cli", "serve", str(lake), "--port", str(self.port),
               "--rate-limit", "1000000", "--burst", "1000000"]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"curation serve exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                status, _ = self.call("GET", "/health")
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError("curation serve did not become healthy in 300 s")

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, json.dumps(body) if body else None, {"Content-Type": "application/json"})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def knn_body(q: np.ndarray, k: int, extra: dict[str, Any]) -> bytes:
    return json.dumps({"embedding_input": q.tolist(), "modality": "image", "num_images": k,
                       "num_result_ids": k, "indice_name": "curation", **extra}).encode()


def run_queries(port: int, bodies: list[bytes]) -> tuple[list[float], list[list[dict[str, Any]]]]:
    """POST each body over one keep-alive connection: per-query milliseconds and the decoded results."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    times, results = [], []
    headers = {"Content-Type": "application/json"}
    for body in bodies:
        t = time.perf_counter()
        conn.request("POST", "/knn-service", body, headers)
        r = conn.getresponse()
        data = r.read()
        times.append((time.perf_counter() - t) * 1000)
        if r.status != 200:
            raise RuntimeError(f"/knn-service answered {r.status}: {data[:500]!r}")
        results.append(json.loads(data))
    conn.close()
    return times, results


def concurrent_qps(port: int, bodies: list[bytes], clients: int) -> float:
    """Queries per second with `clients` connections sending the bodies at once."""
    chunks = [bodies[i::clients] for i in range(clients)]
    threads = [threading.Thread(target=run_queries, args=(port, c)) for c in chunks]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(bodies) / (time.perf_counter() - started)


def latency(times: list[float]) -> dict[str, float]:
    a = np.asarray(times)
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "qps_sequential": round(1000 / float(a.mean()), 1)}


def exact_filtered(gen: Generation, mask: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k uids among the rows passing `mask` (inner product over the store's embeddings)."""
    rows = np.flatnonzero(mask)
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_r = np.zeros((len(queries), k), np.int64)
    for i in range(0, len(rows), 100_000):
        chunk = rows[i:i + 100_000]
        s = queries @ gen.store.embeddings(chunk).T
        all_s = np.concatenate([best_s, s], axis=1)
        all_r = np.concatenate([best_r, np.broadcast_to(chunk, s.shape)], axis=1)
        top = np.argsort(-all_s, axis=1)[:, :k]
        best_s, best_r = np.take_along_axis(all_s, top, 1), np.take_along_axis(all_r, top, 1)
    return gen.store.uids[best_r]


def in_process(gen: Generation, queries: np.ndarray, k: int, filters: Filters) -> dict[str, float]:
    times = []
    for q in queries:
        t = time.perf_counter()
        hits(gen, gen.search(q[None, :], k, filters)[0])
        times.append((time.perf_counter() - t) * 1000)
    return latency(times)


def metadata_lookup(lake: Path, gen: Generation, uid_sets: list[list[int]]) -> dict[str, float]:
    """p50 ms to describe k uids: the metastore against DuckDB joining the lake's parquet."""
    store_ms, duck_ms = [], []
    con = duckdb.connect()
    lake_ = Lake(str(lake))
    pairs = [str(Path(lake_.root) / "pairs" / "*" / "*" / "pairs.parquet")]
    clip = [str(Path(lake_.root) / "clip" / "*" / "*" / "clip.parquet")]
    sql = (f"SELECT p.{R.UID}, p.{R.URL}, p.{R.TEXT}, c.{R.AESTHETIC}, c.{R.PUNSAFE}, c.{R.PWATERMARK}, "
           f"c.{R.SIMILARITY} FROM read_parquet(?) p JOIN read_parquet(?) c USING ({R.UID}) "
           f"WHERE p.{R.UID} IN (SELECT unnest(?::BIGINT[]))")
    for uids in uid_sets:
        t = time.perf_counter()
        gen.store.rows(gen.store.positions(uids))
        store_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        rows = con.execute(sql, [pairs, clip, uids]).fetchall()
        duck_ms.append((time.perf_counter() - t) * 1000)
        assert len(rows) == len(uids), (len(rows), len(uids))
    return {"metastore_p50_ms": round(float(np.median(store_ms)), 3),
            "duckdb_scan_p50_ms": round(float(np.median(duck_ms)), 1)}


def check_filter(results: list[list[dict[str, Any]]], floor: float, k: int) -> None:
    for res in results:
        assert len(res) == k, f"{len(res)} hits, wanted {k}"
        bad = [r for r in res if r[R.AESTHETIC] < floor]
        assert not bad, f"{len(bad)} hits below min_aesthetic {floor}"


def measure(lake: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    build_s = make_lake(lake, n, args.dim)
    gen = Generation.load(str(lake))
    floor = float(np.percentile(gen.store.numeric(R.AESTHETIC), 90))
    filters = Filters(ranges=((R.AESTHETIC, floor, None),))
    passing = int(gen.mask(filters).sum())
    queries = unit_vectors(args.queries + WARMUP, args.dim, seed=999_999)
    out: dict[str, Any] = {"n": n, "index": f"{gen.manifest.factory}, nprobe {gen.manifest.nprobe}",
                           "build_s": round(build_s, 1), "filter": f"min_aesthetic {floor:.3f}",
                           "filter_passes": round(passing / len(gen.store), 4)}
    service = Service(lake)
    try:
        for label, extra in (("unfiltered", {}), ("filtered", {"min_aesthetic": floor})):
            bodies = [knn_body(q, args.k, extra) for q in queries]
            run_queries(service.port, bodies[:WARMUP])
            times, results = run_queries(service.port, bodies[WARMUP:])
            if extra:
                check_filter(results, floor, args.k)
            out[f"http_{label}"] = {**latency(times), "qps_concurrent": round(
                concurrent_qps(service.port, bodies[WARMUP:], args.clients), 1)}
            found = np.array([[r["uid"] for r in res] for res in results[:100]])
            mask = gen.mask(filters) if extra else np.ones(len(gen.store), bool)
            out[f"http_{label}"]["recall_at_k"] = round(recall_at_k(
                found, exact_filtered(gen, mask, queries[WARMUP:WARMUP + 100], args.k)), 4)
            out[f"in_process_{label}"] = in_process(gen, queries[WARMUP:], args.k, filters if extra else Filters())
        out["server_peak_rss_mb"] = round(service.peak_rss_mb(), 1)
    finally:
        service.stop()
    sample = [[int(r["uid"]) for r in res] for res in results[:50]]
    out["metadata_k_uids"] = metadata_lookup(lake, gen, sample)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,1000000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--k", type=int, default=40)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--workdir", default=None, help="where the lakes live (default a new temp dir)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-serve-"))
    report = {"sizes": [], "args": vars(args), "cpus": os.cpu_count()}
    for n in (int(s) for s in args.sizes.split(",")):
        r = measure(work / f"lake-{n}", n, args)
        print(json.dumps(r, indent=2), flush=True)
        report["sizes"].append(r)
    if len(report["sizes"]) >= 2:
        small, big = report["sizes"][0], report["sizes"][-1]
        report["ratio_p99_largest_to_smallest"] = {
            label: round(big[f"http_{label}"]["p99_ms"] / small[f"http_{label}"]["p99_ms"], 2)
            for label in ("unfiltered", "filtered")}
        print(json.dumps(report["ratio_p99_largest_to_smallest"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
