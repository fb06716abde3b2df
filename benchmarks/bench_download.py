"""Benchmark curation.download.download_images against plain img2dataset on a loopback image server.

    python benchmarks/bench_download.py --n 2000 [--processes 2] [--threads 32] [--repeat 1] [--json OUT]

A ThreadingHTTPServer on 127.0.0.1 serves N distinct URLs (a few generated noise JPEGs reused, so bodies
are > 5000 bytes and realistic to resize). On the same URL list, in one run, it times (best of --repeat,
alternating the order):
  img2dataset          img2dataset.download standalone: same image_size, resize mode, processes, threads,
                       shard size, hash, retries and timeout; no guard, default global opener;
  img2dataset_core     img2dataset's Reader/Resizer/Downloader/writer/distributor composed exactly as
                       download_images composes them, but unsubclassed and without img2dataset's logger
                       process (a third spawned interpreter that download() starts): the fair baseline
                       for our overhead;
  ours_nocap           download_images with the SSRF guard, header checks, hop recorder and downloads
                       table, but no per-host cap (the pure cost of our plumbing);
  ours                 download_images with the defaults, including max_connections_per_host=4, which on a
                       single-host benchmark throttles every worker process to 4 connections.
Both include img2dataset's worker start-up (~10 s per spawned process on a slow machine), so small N
overstates fixed costs. It checks that every variant downloads the same number of images.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from curation import records as R  # noqa: E402
from curation.download import DownloadConfig, download_images  # noqa: E402
from curation.netguard import NetPolicy  # noqa: E402


def make_images(count: int, width: int, height: int) -> list[bytes]:
    out = []
    for seed in range(count):
        rng = random.Random(seed)
        # smooth-ish noise: a small random image upscaled, so JPEG sizes look like photos (tens of KB)
        small = Image.frombytes("RGB", (width // 8, height // 8), rng.randbytes(width // 8 * height // 8 * 3))
        buf = io.BytesIO()
        small.resize((width, height), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def start_server(images: list[bytes]) -> tuple[ThreadingHTTPServer, int]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:
            try:
                body = images[int(self.path.rsplit("/", 1)[-1].split(".")[0]) % len(images)]
            except ValueError:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.request_queue_size = 256
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, httpd.server_address[1]


def run_img2dataset(pairs_path: str, out: str, cfg: DownloadConfig) -> dict[str, Any]:
    import img2dataset

    started = time.perf_counter()
    img2dataset.download(
        url_list=pairs_path, input_format="parquet", url_col=R.URL, caption_col=R.TEXT,
        save_additional_columns=[R.UID], output_format="webdataset", output_folder=out,
        image_size=cfg.image_size, resize_mode=cfg.resize_mode,
        resize_only_if_bigger=cfg.resize_only_if_bigger, encode_format=cfg.encode_format,
        encode_quality=cfg.encode_quality, processes_count=cfg.processes, thread_count=cfg.threads,
        number_sample_per_shard=cfg.number_sample_per_shard, distributor="multiprocessing",
        timeout=int(cfg.timeout_s), retries=cfg.retries, extract_exif=cfg.extract_exif,
        compute_hash="sha256", user_agent_token=cfg.user_agent_token,
        disallowed_header_directives=list(cfg.disallowed_header_directives),
    )
    return {"wall_s": time.perf_counter() - started, "successes": _successes(out)}


def run_img2dataset_core(pairs_path: str, out: str, cfg: DownloadConfig) -> dict[str, Any]:
    """img2dataset's own classes composed as its main.download does, minus the logger process."""
    from img2dataset.distributor import multiprocessing_distributor
    from img2dataset.downloader import Downloader
    from img2dataset.reader import Reader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    started = time.perf_counter()
    Path(out, "_tmp").mkdir(parents=True)
    reader = Reader(pairs_path, "parquet", R.URL, R.TEXT, None, None, [R.UID], cfg.number_sample_per_shard,
                    set(), f"{out}/_tmp", 0)
    resizer = Resizer(image_size=cfg.image_size, resize_mode=cfg.resize_mode,
                      resize_only_if_bigger=cfg.resize_only_if_bigger, encode_quality=cfg.encode_quality,
                      encode_format=cfg.encode_format)
    downloader = Downloader(
        sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=cfg.threads,
        save_caption=True, extract_exif=cfg.extract_exif, output_folder=out, column_list=reader.column_list,
        timeout=cfg.timeout_s, number_sample_per_shard=cfg.number_sample_per_shard, oom_shard_count=5,
        compute_hash="sha256", verify_hash_type=None, encode_format=cfg.encode_format, retries=cfg.retries,
        user_agent_token=cfg.user_agent_token,
        disallowed_header_directives=list(cfg.disallowed_header_directives))
    multiprocessing_distributor(cfg.processes, downloader, reader, None, cfg.max_shard_retry)
    return {"wall_s": time.perf_counter() - started, "successes": _successes(out)}


def _successes(out: str) -> int:
    return sum(pq.read_table(p, columns=["status"]).column("status").to_pylist().count("success")
               for p in Path(out).glob("*.parquet"))


def run_ours(pairs_path: str, out: str, cfg: DownloadConfig) -> dict[str, Any]:
    started = time.perf_counter()
    result = download_images(pairs_path, out, cfg, NetPolicy.with_loopback())
    wall = time.perf_counter() - started
    return {"wall_s": wall, "successes": result.counts_by_status.get(R.STATUS_SUCCESS, 0),
            "counts_by_status": result.counts_by_status}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--source-size", default="640x480", help="served image size, WxH")
    ap.add_argument("--shard-size", type=int, default=0, help="samples per shard (default: n / processes)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", help="write the results as JSON here")
    args = ap.parse_args()

    width, height = (int(x) for x in args.source_size.split("x"))
    images = make_images(16, width, height)
    httpd, port = start_server(images)
    shard = args.shard_size or max(1, -(-args.n // args.processes))
    base = DownloadConfig(image_size=args.image_size, processes=args.processes, threads=args.threads,
                          number_sample_per_shard=shard)
    variants = {
        "img2dataset": (run_img2dataset, base),
        "img2dataset_core": (run_img2dataset_core, base),
        "ours_nocap": (run_ours, DownloadConfig(**{**base.__dict__, "max_connections_per_host": None})),
        "ours": (run_ours, base),
    }
    work = Path(tempfile.mkdtemp(prefix="bench-download-"))
    try:
        urls = [f"http://127.0.0.1:{port}/img/{i}.jpg" for i in range(args.n)]
        pairs_path = str(work / "pairs.parquet")
        pq.write_table(pa.table({R.UID: pa.array(range(args.n), pa.int64()), R.URL: urls,
                                 R.TEXT: [f"image {i}" for i in range(args.n)]}), pairs_path)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
        for rep in range(args.repeat):
            order = list(variants) if rep % 2 == 0 else list(reversed(variants))
            for name in order:
                fn, cfg = variants[name]
                out = work / f"{name}-{rep}"
                res = fn(pairs_path, str(out), cfg)
                shutil.rmtree(out, ignore_errors=True)
                runs[name].append(res)
                print(f"[{rep}] {name:12s} {res['wall_s']:7.2f} s  {res['successes']} ok", flush=True)
    finally:
        httpd.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    best = {name: min(r["wall_s"] for r in rs) for name, rs in runs.items()}
    successes = {name: rs[-1]["successes"] for name, rs in runs.items()}
    report = {
        "n": args.n, "processes": args.processes, "threads": args.threads, "image_size": args.image_size,
        "source_size": args.source_size, "shard_size": shard, "repeat": args.repeat,
        "wall_s_best": best,
        "wall_s_median": {name: statistics.median(r["wall_s"] for r in rs) for name, rs in runs.items()},
        "images_per_s_best": {name: successes[name] / best[name] for name in best},
        "successes": successes,
        "overhead_vs_standalone": {k: best[k] / best["img2dataset"] - 1 for k in ("ours_nocap", "ours")},
        "overhead_vs_core": {k: best[k] / best["img2dataset_core"] - 1 for k in ("ours_nocap", "ours")},
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    if len(set(successes.values())) != 1:
        raise SystemExit(f"variants disagree on successes: {successes}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
