"""Tests for the downloads stage: img2dataset runs against loopback servers, guarded by our policies.

img2dataset's spawned workers take ~10 s to start, so one module-scoped run covers most behaviours and a
second identical run checks that a rerun replaces the output exactly.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curation import records as R
from curation.download import (
    DOWNLOADS_SCHEMA,
    ROBOTS_ERROR,
    DownloadConfig,
    DownloadResult,
    GuardedDownloader,
    GuardedResizer,
    build_downloads_table,
    download_images,
    header_refusal,
)
from curation.netguard import NetPolicy
from tests.test_curation.test_netguard import LoopbackServer, Reply, noise_image


def bitmap_png(width: int, height: int) -> bytes:
    """A 1-bit all-black PNG built with zlib: a few KB on the wire, width*height pixels when decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


JPG = noise_image(640, 320, "JPEG", seed=1)
PNG = noise_image(300, 200, "PNG", seed=2)
SMALL = noise_image(16, 16, "JPEG", seed=3)
BOMB = bitmap_png(20_000, 20_000)  # 400 Mpx, ~50 KB
OVERSIZED = bitmap_png(9460, 9460)  # 89,491,600 px: just over the LAION limit of 89,478,484
HTML = b"<html><body>" + b"<p>not an image</p>" * 400 + b"</body></html>"
BIG = noise_image(1200, 900, "PNG", seed=4)  # > the 2 MB cap the run uses
CONFIG = DownloadConfig(image_size=64, threads=8, number_sample_per_shard=10, max_image_bytes=2_000_000,
                        max_connections_per_host=2, retries=1)


@dataclass
class Case:
    path: str  # on the allowed server (127.0.0.2), or a full URL
    status: str
    error: str | None = None  # prefix
    http_status: int | None = None
    final_path: str | None = None


@dataclass
class Run:
    result: DownloadResult
    out: Path
    cases: list[Case]
    urls: list[str]
    allowed: LoopbackServer
    internal: LoopbackServer


def _routes() -> dict[str, Reply | list[Reply]]:
    slow = 0.1  # images take a moment, so 8 threads would overlap without the per-host cap
    return {
        "/ok.jpg": Reply(body=JPG, headers={"Content-Type": "image/jpeg"}, delay_s=slow),
        "/ok.png": Reply(body=PNG, headers={"Content-Type": "image/png"}, delay_s=slow),
        "/r1": Reply(302, headers={"Location": "/r2"}),
        "/r2": Reply(301, headers={"Location": "/ok.png"}),
        "/404": Reply(404, b"missing"),
        "/500": Reply(500, b"boom"),
        "/flaky.jpg": [Reply(503, b"busy"), Reply(body=JPG)],
        "/noai.jpg": Reply(body=JPG, headers={"X-Robots-Tag": "noai"}),
        "/other-bot.jpg": Reply(body=JPG, headers={"X-Robots-Tag": "otherbot: noai"}, delay_s=slow),
        "/page.html": Reply(body=HTML, headers={"Content-Type": "text/html"}),
        "/truncated.jpg": Reply(body=JPG[:20_000], content_length=len(JPG)),
        "/small.jpg": Reply(body=SMALL),
        "/bomb.png": Reply(body=BOMB),
        "/oversized.png": Reply(body=OVERSIZED),
        "/big.png": Reply(body=BIG),
    }


def _cases(internal: LoopbackServer) -> list[Case]:
    secret = internal.url("/ok.jpg")
    return [
        Case("/ok.jpg", R.STATUS_SUCCESS, None, 200, "/ok.jpg"),
        Case("/ok.png", R.STATUS_SUCCESS, None, 200, "/ok.png"),
        Case("/r1", R.STATUS_SUCCESS, None, 200, "/ok.png"),
        Case("/404", R.STATUS_FAILED_DOWNLOAD, "HTTP Error 404", 404, "/404"),
        Case("/500", R.STATUS_FAILED_DOWNLOAD, "HTTP Error 500", 500, "/500"),
        Case("/flaky.jpg", R.STATUS_SUCCESS, None, 200, "/flaky.jpg"),
        Case("/noai.jpg", R.STATUS_BLOCKED, ROBOTS_ERROR, 200, "/noai.jpg"),
        Case("/other-bot.jpg", R.STATUS_SUCCESS, None, 200, "/other-bot.jpg"),
        Case("/page.html", R.STATUS_FAILED_RESIZE, "not an image", 200, "/page.html"),
        Case("/truncated.jpg", R.STATUS_FAILED_DOWNLOAD, "IncompleteRead", 200, "/truncated.jpg"),
        Case("/small.jpg", R.STATUS_FAILED_RESIZE, f"body too small: {len(SMALL)} bytes < 5000", 200),
        Case("/bomb.png", R.STATUS_FAILED_RESIZE, "too many pixels", 200),
        Case("/oversized.png", R.STATUS_FAILED_RESIZE,
             "too many pixels: 9460x9460 = 89491600 > 89478484", 200),
        Case("/big.png", R.STATUS_FAILED_DOWNLOAD,
             f"body too large: Content-Length {len(BIG)} > 2000000", 200),
        Case("/ok.jpg", R.STATUS_SUCCESS, None, 200, "/ok.jpg"),  # a duplicate URL gets its own row
        # SSRF: the internal server (127.0.0.1) must never see a request, however it is addressed.
        Case(secret, R.STATUS_BLOCKED, "blocked: 127.0.0.1 is loopback", None, secret),
        Case(f"http://localhost:{internal.port}/ok.jpg", R.STATUS_BLOCKED, "blocked: 127.0.0.1 is loopback"),
        Case(f"http://0.0.0.0:{internal.port}/ok.jpg", R.STATUS_BLOCKED, "blocked: 0.0.0.0 is unspecified"),
        Case(f"http://[::1]:{internal.port}/ok.jpg", R.STATUS_BLOCKED, "blocked: ::1 is loopback"),
        Case("/to-internal", R.STATUS_BLOCKED, "blocked: 127.0.0.1 is loopback", 302, secret),
        Case("/to-localhost", R.STATUS_BLOCKED, "blocked: 127.0.0.1 is loopback", 302),
        Case("http://169.254.169.254/latest/meta-data/", R.STATUS_BLOCKED,
             "blocked: 169.254.169.254 is a cloud"),
        Case("http://metadata.google.internal/computeMetadata/v1/", R.STATUS_BLOCKED,
             "blocked: metadata.google.internal is a cloud metadata host name"),
        Case("file:///etc/passwd", R.STATUS_BLOCKED, "blocked: scheme 'file' not allowed"),
    ]


def _url(case: Case, allowed: LoopbackServer) -> str:
    return case.path if "://" in case.path else allowed.url(case.path)


def _pairs(urls: list[str]) -> pa.Table:
    uids = [1000 + 7 * i for i in range(len(urls))]
    return pa.table({R.UID: pa.array(uids, pa.int64()), R.URL: urls, R.TEXT: [f"caption {u}" for u in uids]})


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[LoopbackServer, LoopbackServer]]:
    internal = LoopbackServer({"/ok.jpg": Reply(body=JPG)}, host="127.0.0.1").__enter__()
    routes = _routes()
    routes["/to-internal"] = Reply(302, headers={"Location": internal.url("/ok.jpg")})
    routes["/to-localhost"] = Reply(302, headers={"Location": f"http://localhost:{internal.port}/ok.jpg"})
    allowed = LoopbackServer(routes, host="127.0.0.2").__enter__()
    yield allowed, internal
    allowed.__exit__()
    internal.__exit__()


@pytest.fixture(scope="module")
def run(servers: tuple[LoopbackServer, LoopbackServer], tmp_path_factory: pytest.TempPathFactory) -> Run:
    allowed, internal = servers
    cases = _cases(internal)
    urls = [_url(c, allowed) for c in cases]
    out = tmp_path_factory.mktemp("downloads")
    # Loopback is NOT allowed: only the one explicitly listed test host is.
    policy = NetPolicy(allow_cidrs=("127.0.0.2/32",))
    result = download_images(_pairs(urls), str(out), CONFIG, policy)
    return Run(result, out, cases, urls, allowed, internal)


def _rows(run: Run) -> list[dict[str, Any]]:
    return run.result.table.to_pylist()


def test_one_row_per_input_pair_with_exact_schema(run: Run) -> None:
    table = run.result.table
    assert table.schema == DOWNLOADS_SCHEMA
    assert table.column(R.UID).to_pylist() == [1000 + 7 * i for i in range(len(run.cases))]
    assert len(set(table.column(R.KEY).to_pylist())) == table.num_rows
    assert table.column(R.SHARD).to_pylist() == [f"{i // 10:05d}" for i in range(len(run.cases))]
    assert table.column(R.KEY).to_pylist()[11] == "000011"  # img2dataset's key: shard 1, index 1


def test_each_behaviour_gets_its_status_and_reason(run: Run) -> None:
    for case, url, row in zip(run.cases, run.urls, _rows(run), strict=True):
        got = (row[R.STATUS], row[R.ERROR])
        assert row[R.STATUS] == case.status, (url, got)
        if case.error is None:
            assert row[R.ERROR] is None, (url, got)
        else:
            assert row[R.ERROR] is not None and row[R.ERROR].startswith(case.error), (url, got)
        assert row[R.HTTP_STATUS] == case.http_status, (url, row[R.HTTP_STATUS])
        if case.final_path is not None:
            want = case.final_path if "://" in case.final_path else run.allowed.url(case.final_path)
            assert row[R.FINAL_URL] == want, url


def test_successes_have_sizes_and_hash_of_the_downloaded_bytes(run: Run) -> None:
    by_url = {url: row for url, row in zip(run.urls, _rows(run), strict=True)}
    jpg, png, redirected = (by_url[run.allowed.url(p)] for p in ("/ok.jpg", "/ok.png", "/r1"))
    assert (jpg[R.ORIGINAL_WIDTH], jpg[R.ORIGINAL_HEIGHT], jpg[R.WIDTH], jpg[R.HEIGHT]) == (640, 320, 128, 64)
    assert (png[R.ORIGINAL_WIDTH], png[R.ORIGINAL_HEIGHT], png[R.WIDTH], png[R.HEIGHT]) == (300, 200, 96, 64)
    assert jpg[R.SHA256] == hashlib.sha256(JPG).hexdigest()
    assert redirected[R.SHA256] == png[R.SHA256] == hashlib.sha256(PNG).hexdigest()
    failed = [r for r in _rows(run) if r[R.STATUS] != R.STATUS_SUCCESS]
    assert all(r[R.SHA256] is None and r[R.WIDTH] is None for r in failed)


def test_shards_hold_exactly_the_successes(run: Run) -> None:
    rows = _rows(run)
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted((run.out / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()  # type: ignore[union-attr]
    ok = {r[R.KEY]: r for r in rows if r[R.STATUS] == R.STATUS_SUCCESS}
    assert set(samples) == set(ok)
    for key, parts in samples.items():
        row = ok[key]
        with Image.open(io.BytesIO(parts["jpg"])) as im:
            assert im.size == (row[R.WIDTH], row[R.HEIGHT])
        assert parts["txt"].decode() == f"caption {row[R.UID]}"
        assert json.loads(parts["json"])["uid"] == row[R.UID]
    assert sorted(p.name for p in run.out.iterdir()) == ["shards"]  # no staging leftovers


def test_internal_server_never_contacted(run: Run) -> None:
    assert run.internal.requests == []
    blocked = [r for r in _rows(run) if r[R.STATUS] == R.STATUS_BLOCKED]
    assert len(blocked) == 10
    # the allowed server did serve the redirects that pointed inward
    assert "/to-internal" in run.allowed.requests and "/to-localhost" in run.allowed.requests


def test_politeness_user_agent_and_host_cap(run: Run) -> None:
    assert run.allowed.user_agents and all("compatible; curation;" in ua for ua in run.allowed.user_agents)
    # The server counts a request until its handler returns, a moment after the client has read (or, for
    # errors and redirects, closed) the response and released its slot: allow that one of lag. Uncapped,
    # the 8 worker threads overlap far more; test_netguard checks the cap strictly with slow replies.
    assert run.allowed.peak <= CONFIG.max_connections_per_host + 1  # type: ignore[operator]


def test_counts_and_rates(run: Run) -> None:
    res = run.result
    assert res.counts_by_status == {R.STATUS_SUCCESS: 6, R.STATUS_FAILED_DOWNLOAD: 4,
                                    R.STATUS_FAILED_RESIZE: 4, R.STATUS_BLOCKED: 10}
    assert res.counts_by_reason["x_robots_tag"] == 1
    assert sum(res.counts_by_reason.values()) == 24 - 6
    assert res.success_rate == pytest.approx(6 / 24)
    assert res.duration_s > 0 and res.images_per_s == pytest.approx(6 / res.duration_s)


def test_rerun_replaces_output_exactly(run: Run) -> None:
    def snapshot() -> dict[str, Any]:
        shards = run.out / "shards"
        files = sorted(p.name for p in shards.iterdir())
        tars = {}
        for tar in sorted(shards.glob("*.tar")):
            with tarfile.open(tar) as tf:
                tars[tar.name] = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}  # type: ignore[union-attr]
        parquets = {p.name: pq.read_table(p).sort_by("key").to_pylist()
                    for p in sorted(shards.glob("*.parquet"))}
        return {"files": files, "tars": tars, "parquets": parquets}

    before = snapshot()
    (run.out / "shards" / "99999.tar").write_bytes(b"stale")  # must not survive the rerun
    (run.out / ".staging-deadbeef").mkdir()  # an interrupted run's leftover
    again = download_images(_pairs(run.urls), str(run.out), CONFIG, NetPolicy(allow_cidrs=("127.0.0.2/32",)))
    assert again.table.equals(run.result.table)
    assert snapshot() == before
    assert sorted(p.name for p in run.out.iterdir()) == ["shards"]


# --- in-process checks (no img2dataset workers) -----------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Reset this process's peak RSS (VmHWM), so the peak measures only what follows, not earlier tests."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(row for row in f if row.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused_from_the_header_without_decoding() -> None:
    with pytest.raises(Image.DecompressionBombError, match="400000000 pixels"):  # a real 400 Mpx bomb
        Image.open(io.BytesIO(BOMB))
    resizer = GuardedResizer(min_image_bytes=5000, max_image_pixels=89_478_484,
                             allowed_formats=("JPEG", "PNG", "WEBP"), image_size=64, resize_mode="keep_ratio",
                             resize_only_if_bigger=True)
    _reset_peak_rss()
    rss_before = _rss_bytes()
    started = time.perf_counter()
    for blob in (BOMB, OVERSIZED):
        out = resizer(io.BytesIO(blob))
        assert out[0] is None and out[-1].startswith("too many pixels"), out[-1]
    elapsed = time.perf_counter() - started
    peak = _peak_rss_bytes()
    # Decoding would allocate >= 400 MB (bomb) + 89 MB (oversized) on top of the current RSS.
    assert peak < rss_before + 150 * 2**20
    assert elapsed < 1.0


def test_header_refusal_rules() -> None:
    rules = {"min_image_bytes": 5000, "max_image_pixels": 640 * 320, "allowed_formats": ("JPEG", "PNG")}
    assert header_refusal(io.BytesIO(JPG), **rules) is None  # type: ignore[arg-type]
    assert header_refusal(io.BytesIO(JPG), **{**rules, "max_image_pixels": 640 * 320 - 1}) == (  # type: ignore[arg-type]
        "too many pixels: 640x320 = 204800 > 204799")
    webp = noise_image(100, 100, "WEBP")
    assert header_refusal(io.BytesIO(webp), **rules) == "unsupported image format WEBP"  # type: ignore[arg-type]
    assert header_refusal(io.BytesIO(SMALL), **{**rules, "min_image_bytes": 0}) is None  # type: ignore[arg-type]


def test_guarded_resizer_delegates_to_img2dataset() -> None:
    resizer = GuardedResizer(min_image_bytes=5000, max_image_pixels=10**8, allowed_formats=(),
                             image_size=64, resize_mode="center_crop", resize_only_if_bigger=False)
    img, width, height, ow, oh, err = resizer(io.BytesIO(PNG))
    assert err is None and (width, height, ow, oh) == (64, 64, 300, 200)
    with Image.open(io.BytesIO(img)) as im:
        assert im.format == "JPEG" and im.size == (64, 64)


def test_missing_shard_rows_are_reported_not_dropped(tmp_path: Path) -> None:
    pairs = _pairs(["http://a.example/1.jpg", "http://a.example/2.jpg"])
    (tmp_path / "shards").mkdir()
    (tmp_path / "net").mkdir()
    table = build_downloads_table(pairs, str(tmp_path / "shards"), str(tmp_path / "net"), 10)
    assert table.num_rows == 2 and set(table.column(R.STATUS).to_pylist()) == {R.STATUS_FAILED_DOWNLOAD}
    assert table.column(R.KEY).to_pylist() == ["000000", "000001"]


def test_config_validates_on_construction() -> None:
    for bad in ({"resize_mode": "stretch"}, {"encode_format": "gif"}, {"image_size": 0},
                {"max_connections_per_host": 0}, {"min_image_bytes": -1}, {"threads": 0},
                {"user_agent_token": "a;b"}, {"max_image_bytes": 100}):
        with pytest.raises(ValueError):
            DownloadConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="uid"):
        download_images(pa.table({"url": ["x"]}), "/nonexistent", DownloadConfig(), NetPolicy())


def test_img2dataset_extension_points_still_match() -> None:
    """Fails loudly if img2dataset changes the constructor arguments or the call shape we build on."""
    import inspect

    from img2dataset.downloader import Downloader, download_image
    from img2dataset.resizer import Resizer

    params = set(inspect.signature(Downloader.__init__).parameters)
    assert {"sample_writer_class", "resizer", "thread_count", "timeout", "retries", "user_agent_token",
            "disallowed_header_directives", "compute_hash", "column_list"} <= params
    assert {"max_image_area", "resize_only_if_bigger", "encode_format"} <= set(
        inspect.signature(Resizer.__init__).parameters)
    assert list(inspect.signature(download_image).parameters) == [
        "row", "timeout", "user_agent_token", "disallowed_header_directives"]
    # download_image must use the process-global opener: urlopen without a context argument.
    src = inspect.getsource(download_image)
    assert "urllib.request.urlopen(request, timeout=timeout)" in src
    assert issubclass(GuardedDownloader, Downloader) and callable(GuardedDownloader.__call__)
