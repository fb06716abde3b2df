"""Takedown lists enforced at crawl time (issue 17): a blocked pair is never fetched, a listed image never stored.

The lists go through the lake's store (`blocklist.parse_list` / `store_list`) and come back as the crawl blocklist,
so these tests read what a later crawl reads. One module-scoped img2dataset run against two loopback servers covers
the download side (its spawned workers take ~10 s to start); extraction and the stage wiring run in process.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from curation import blocklist as B
from curation import io as cio
from curation import records as R
from curation.download import (
    DOWNLOADS_SCHEMA,
    PAIR_TAKEDOWN_ERROR,
    DownloadConfig,
    DownloadResult,
    GuardedResizer,
    classify_error,
    download_images,
    verify_shards,
)
from curation.layout import Lake, Partition
from curation.netguard import NetPolicy
from curation.phash import phash_bytes, to_hex
from curation.stages import materialize_downloads, materialize_pairs
from curation.wat import extract_pairs, laion_uid
from tests.test_curation.test_netguard import LoopbackServer, Reply
from tests.test_curation.test_wat import img, page_members, warcinfo_member, write_wat

CONFIG = DownloadConfig(image_size=128, threads=4, number_sample_per_shard=4, retries=0,
                        max_connections_per_host=2)
POLICY = NetPolicy(allow_cidrs=("127.0.0.2/32", "127.0.0.3/32"))
NEAR_RADIUS = 6
BLOCKED_PHRASE = "forbidden phrase"


# --- images whose pHash means something: shapes on a background, with noise so they are > 5000 bytes


def scene(seed: int, width: int = 480, height: int = 360) -> Image.Image:
    rng = random.Random(seed)
    im = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))  # type: ignore[arg-type]
    draw = ImageDraw.Draw(im)
    for _ in range(6):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        draw.ellipse((x0, y0, x0 + rng.randrange(40, 200), y0 + rng.randrange(40, 200)),
                     fill=tuple(rng.randrange(256) for _ in range(3)))  # type: ignore[arg-type]
    noise = np.random.default_rng(seed).integers(-12, 13, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(im, np.int16) + noise, 0, 255).astype(np.uint8))


def encode(im: Image.Image, fmt: str = "JPEG", quality: int = 92, scale: float = 1.0) -> bytes:
    if scale != 1.0:
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def cropped(im: Image.Image, share: float) -> Image.Image:
    dx, dy = int(im.width * share), int(im.height * share)
    return im.crop((dx, dy, im.width - dx, im.height - dy))


def resizer(blocklist: B.CrawlBlocklist | None = None) -> GuardedResizer:
    """The resizer a download run with CONFIG builds."""
    return GuardedResizer(min_image_bytes=CONFIG.min_image_bytes, max_image_pixels=CONFIG.max_image_pixels,
                          allowed_formats=CONFIG.allowed_formats, blocklist=blocklist, image_size=CONFIG.image_size,
                          resize_mode=CONFIG.resize_mode, resize_only_if_bigger=CONFIG.resize_only_if_bigger,
                          encode_quality=CONFIG.encode_quality, encode_format=CONFIG.encode_format)


def stored_phash(body: bytes) -> int:
    """The pHash of what a download stores for `body` (what clip's `phash` column holds)."""
    out = resizer()(io.BytesIO(body))
    assert out[-1] is None, out[-1]
    hashes, errors = phash_bytes([out[0]])
    assert errors == [None]
    return int(hashes[0])


def distance(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


P = scene(1)  # listed by pHash with a radius: a rotated copy of it is served
Q = scene(2)  # listed by its exact pHash (radius 0)
BODIES = {
    "/ok1.jpg": encode(scene(5)),
    "/ok2.png": encode(scene(6), "PNG"),
    "/ok3.jpg": encode(scene(7)),
    "/listed-url.jpg": encode(scene(8)),
    "/uid.jpg": encode(scene(9)),
    "/caption.jpg": encode(scene(10)),
    "/sha.jpg": encode(scene(3)),
    "/sha-again.jpg": encode(scene(3)),  # the same bytes at another URL
    "/md5.png": encode(scene(4), "PNG"),
    "/near.jpg": encode(P.rotate(2, resample=Image.Resampling.BICUBIC), quality=85),
    "/q-copy.jpg": encode(Q, quality=50, scale=0.85),  # other bytes, same stored pHash
    "/q-cropped.jpg": encode(cropped(Q, 0.03), quality=85),  # a few bits off Q's
}
P_PHASH = stored_phash(encode(P))
Q_PHASH = stored_phash(encode(Q))
LISTED_UID = 4242


@dataclass(frozen=True)
class Case:
    path: str
    status: str
    reason: str | None = None  # the list, for blocked rows
    host: str = "a"  # "a": the allowed server, "b": the host-listed one
    uid: int | None = None
    text: str | None = None


CASES = [
    Case("/ok1.jpg", R.STATUS_SUCCESS),
    Case("/listed-url.jpg", R.STATUS_BLOCKED, "pairs"),
    Case("/sha.jpg", R.STATUS_BLOCKED, "sha-list"),
    Case("/ok2.png", R.STATUS_SUCCESS),
    Case("/b.jpg", R.STATUS_BLOCKED, "hosts", host="b"),
    Case("/md5.png", R.STATUS_BLOCKED, "md5-list"),
    Case("/near.jpg", R.STATUS_BLOCKED, "near"),
    Case("/uid.jpg", R.STATUS_BLOCKED, "pairs", uid=LISTED_UID),
    Case("/ok3.jpg", R.STATUS_SUCCESS),
    Case("/q-copy.jpg", R.STATUS_BLOCKED, "exact"),
    Case("/q-cropped.jpg", R.STATUS_SUCCESS),
    Case("/caption.jpg", R.STATUS_BLOCKED, "captions", text=f"a photo with a {BLOCKED_PHRASE.upper()} in it"),
    Case("/sha-again.jpg", R.STATUS_BLOCKED, "sha-list"),
    Case("/ok1.jpg", R.STATUS_SUCCESS),  # a duplicate URL keeps its own row and key
]
PREFILTERED = {"/listed-url.jpg", "/b.jpg", "/uid.jpg", "/caption.jpg"}  # refused before any fetch


def ingest(lake_root: str, name: str, text: str, filename: str, default_kind: str | None = None) -> None:
    data = text.encode()
    entries, _ = B.parse_list(data, filename, default_kind=default_kind)
    B.store_list(lake_root, entries, name=name, reason=f"test list {name}", source=filename,
                 content_sha256=hashlib.sha256(data).hexdigest())


def ingest_all(lake_root: str, a: LoopbackServer) -> None:
    ingest(lake_root, "pairs", f"url {a.url('/listed-url.jpg')}\nuid {LISTED_UID}\n", "pairs.txt")
    ingest(lake_root, "captions", f"caption_keyword {BLOCKED_PHRASE}\n", "captions.txt")
    ingest(lake_root, "hosts", "kind,value\nhost,127.0.0.3\n", "hosts.csv")
    ingest(lake_root, "sha-list", f"image_sha256 {hashlib.sha256(BODIES['/sha.jpg']).hexdigest()}\n", "sha.txt")
    # the shape of the hash lists child-safety organisations share: one md5 a line
    ingest(lake_root, "md5-list", f"# reason: test\n{hashlib.md5(BODIES['/md5.png']).hexdigest().upper()}\n",
           "md5.txt", default_kind=B.KIND_IMAGE_MD5)
    ingest(lake_root, "near", json.dumps({"kind": "phash", "value": to_hex(P_PHASH), "radius": NEAR_RADIUS}),
           "near.jsonl")
    ingest(lake_root, "exact", f"phash {to_hex(Q_PHASH)} radius=0\n", "exact.txt")


@dataclass
class Run:
    result: DownloadResult
    out: Path
    a: LoopbackServer
    b: LoopbackServer
    urls: list[str]
    texts: list[str]
    uids: list[int]


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[LoopbackServer, LoopbackServer]]:
    a = LoopbackServer({p: Reply(body=body) for p, body in BODIES.items()}, host="127.0.0.2").__enter__()
    b = LoopbackServer({"/b.jpg": Reply(body=encode(scene(11)))}, host="127.0.0.3").__enter__()
    yield a, b
    a.__exit__()
    b.__exit__()


@pytest.fixture(scope="module")
def run(servers: tuple[LoopbackServer, LoopbackServer], tmp_path_factory: pytest.TempPathFactory) -> Run:
    a, b = servers
    lake = tmp_path_factory.mktemp("lake")
    ingest_all(str(lake), a)
    blocklist = B.crawl_blocklist(str(lake))
    urls = [(a if c.host == "a" else b).url(c.path) for c in CASES]
    uids = [c.uid if c.uid is not None else 1000 + i for i, c in enumerate(CASES)]
    texts = [c.text or f"caption {u}" for c, u in zip(CASES, uids, strict=True)]
    pairs = pa.table({R.UID: pa.array(uids, pa.int64()), R.URL: urls, R.TEXT: texts})
    out = tmp_path_factory.mktemp("downloads")
    result = download_images(pairs, str(out), CONFIG, POLICY, blocklist=blocklist)
    return Run(result, out, a, b, urls, texts, uids)


def _rows(run: Run) -> list[dict[str, Any]]:
    return run.result.table.to_pylist()


def _tar_samples(shards: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, _, ext = m.name.partition(".")
                samples.setdefault(key, {})[ext] = tf.extractfile(m).read()  # type: ignore[union-attr]
    return samples


def test_phash_cases_are_what_they_claim() -> None:
    """The pHash rows test a radius, not an exact match: the near copy is a few bits off, inside NEAR_RADIUS;
    Q's re-encoded copy is other bytes with the same stored pHash; its cropped copy is off by at least one bit."""
    near = distance(stored_phash(BODIES["/near.jpg"]), P_PHASH)
    assert 0 < near <= NEAR_RADIUS
    assert BODIES["/q-copy.jpg"] != encode(Q) and distance(stored_phash(BODIES["/q-copy.jpg"]), Q_PHASH) == 0
    assert distance(stored_phash(BODIES["/q-cropped.jpg"]), Q_PHASH) > 0
    unrelated = [distance(stored_phash(BODIES[p]), h) for p in ("/ok1.jpg", "/ok2.png", "/ok3.jpg")
                 for h in (P_PHASH, Q_PHASH)]
    assert min(unrelated) > NEAR_RADIUS


def test_each_row_is_blocked_by_its_list_or_downloaded(run: Run) -> None:
    table = run.result.table
    assert table.schema == DOWNLOADS_SCHEMA
    assert table.column(R.UID).to_pylist() == run.uids  # one row per pair, input order
    got = [(r[R.STATUS], r[R.REASON]) for r in _rows(run)]
    want = [(c.status, None if c.reason is None else f"takedown:{c.reason}") for c in CASES]
    assert got == want
    assert run.result.counts_by_status == {R.STATUS_SUCCESS: 5, R.STATUS_BLOCKED: 9}
    assert run.result.counts_by_reason == {"takedown:pairs": 2, "takedown:sha-list": 2, "takedown:hosts": 1,
                                           "takedown:md5-list": 1, "takedown:near": 1, "takedown:exact": 1,
                                           "takedown:captions": 1}


def test_refused_pairs_are_never_requested(run: Run) -> None:
    assert run.b.requests == []  # the host-listed server: not its image, not even its robots.txt
    requested = set(run.a.requests)
    assert not requested & PREFILTERED
    # the hash-listed images were fetched (their hash is only known then) but not stored, see below
    assert {"/sha.jpg", "/sha-again.jpg", "/md5.png", "/near.jpg", "/q-copy.jpg", "/ok1.jpg"} <= requested
    for case, row in zip(CASES, _rows(run), strict=True):
        if case.path in PREFILTERED:
            assert row[R.ERROR] == f"takedown:{case.reason}: {PAIR_TAKEDOWN_ERROR}"
            assert (row[R.SHARD], row[R.KEY], row[R.HTTP_STATUS], row[R.SHA256], row[R.MD5]) == (None,) * 5


def test_listed_images_leave_no_bytes_in_the_shards(run: Run) -> None:
    rows = _rows(run)
    samples = _tar_samples(run.out / "shards")
    ok = {r[R.KEY]: r for r in rows if r[R.STATUS] == R.STATUS_SUCCESS}
    assert set(samples) == set(ok) and len(ok) == 5
    hash_refused = [r for c, r in zip(CASES, rows, strict=True)
                    if c.status == R.STATUS_BLOCKED and c.path not in PREFILTERED]
    assert len(hash_refused) == 5
    for row in hash_refused:
        assert row[R.KEY] is not None and row[R.KEY] not in samples
        assert row[R.ERROR].startswith(row[R.REASON] + ": image ")
        assert row[R.HTTP_STATUS] == 200 and row[R.WIDTH] is None
    assert verify_shards(run.result.table, str(run.out / "shards")) == []
    # nothing stored is a listed image under another key
    stored = phash_bytes([parts["jpg"] for parts in samples.values()])[0]
    assert all(distance(int(h), P_PHASH) > NEAR_RADIUS and int(h) != Q_PHASH for h in stored)


def test_keys_follow_img2dataset_numbering_of_the_pairs_handed_over(run: Run) -> None:
    """img2dataset numbers only the pairs it got: the keys skip the pairs refused before the fetch."""
    rows = _rows(run)
    fetched = [r for c, r in zip(CASES, rows, strict=True) if c.path not in PREFILTERED]
    per_shard = CONFIG.number_sample_per_shard
    assert [r[R.KEY] for r in fetched] == [f"{(i // per_shard) * 10 + i % per_shard:06d}" for i in range(10)]
    assert [r[R.SHARD] for r in fetched] == [f"{i // per_shard:05d}" for i in range(10)]
    samples = _tar_samples(run.out / "shards")
    for row in rows:
        if row[R.STATUS] == R.STATUS_SUCCESS:  # the stored sample is this row's pair
            assert samples[row[R.KEY]]["txt"].decode() == f"caption {row[R.UID]}"
            assert json.loads(samples[row[R.KEY]]["json"])["uid"] == row[R.UID]


def test_md5_and_sha256_are_of_the_served_bytes(run: Run) -> None:
    for case, row in zip(CASES, _rows(run), strict=True):
        if row[R.STATUS] == R.STATUS_SUCCESS:
            body = BODIES[case.path]
            assert row[R.MD5] == hashlib.md5(body).hexdigest(), case.path
            assert row[R.SHA256] == hashlib.sha256(body).hexdigest(), case.path
        else:
            assert row[R.MD5] is None and row[R.SHA256] is None, case.path


# --- in process ---------------------------------------------------------------------------------------


def test_resizer_refuses_listed_bodies_and_records_md5_of_the_rest() -> None:
    listed, other = BODIES["/md5.png"], BODIES["/ok1.jpg"]
    blocklist = B.CrawlBlocklist(image_md5={hashlib.md5(listed).hexdigest(): "md5-list"})
    r = resizer(blocklist)
    out = r(io.BytesIO(listed))
    assert out[0] is None and out[-1] == "takedown:md5-list: image hash on a takedown list"
    img_bytes, *_, err = r(io.BytesIO(other))
    assert err is None and img_bytes
    assert r.md5_by_sha256 == {hashlib.sha256(other).hexdigest(): hashlib.md5(other).hexdigest()}
    # without pHash entries the resizer never hashes its output; without image rules it keeps no blocklist
    assert resizer(B.CrawlBlocklist(hosts={"example.com": "h"})).blocklist is None


def test_takedown_errors_keep_their_list_name() -> None:
    assert classify_error("takedown:ncmec.2025-01: image hash on a takedown list") == "takedown:ncmec.2025-01"
    assert classify_error(f"takedown:pairs: {PAIR_TAKEDOWN_ERROR}") == "takedown:pairs"
    assert classify_error("HTTP Error 404: Not Found") == "http_404"


PAGE = "https://pages.example/gallery/"
LINKS = [
    ("https://img.example/ok.jpg", "a kept picture of a boat"),
    ("https://img.example/listed.jpg", "a picture on the url list"),
    ("https://cdn.blocked.example/x.jpg", "a picture on a listed domain's subdomain"),
    ("https://img.example/uid.jpg", "a picture listed by its uid"),
    ("https://img.example/caption.jpg", f"a picture with a {BLOCKED_PHRASE} in its alt"),
    ("https://img.example/ok2.jpg", "another kept picture"),
]


def _write_page(path: Path) -> None:
    write_wat(path, [warcinfo_member(), *page_members(PAGE, [img(u, t) for u, t in LINKS])])


def _extraction_lists(lake_root: str) -> None:
    uid = laion_uid(*LINKS[3])
    ingest(lake_root, "pairs", f"url {LINKS[1][0]}\nuid {uid + (1 << 64) if uid < 0 else uid}\n", "pairs.txt")
    ingest(lake_root, "hosts", "host blocked.example\n", "hosts.txt")
    ingest(lake_root, "captions", f"caption_keyword {BLOCKED_PHRASE}\n", "captions.txt")


def test_extraction_drops_blocked_pairs_and_counts_them(tmp_path: Path) -> None:
    wat = tmp_path / "page.warc.wat.gz"
    _write_page(wat)
    _extraction_lists(str(tmp_path / "lake"))
    blocklist = B.crawl_blocklist(str(tmp_path / "lake"))
    res = extract_pairs([str(wat)], crawl="CC-MAIN-2024-51", segment="000", blocklist=blocklist)
    assert res.table.column(R.URL).to_pylist() == [LINKS[0][0], LINKS[5][0]]
    assert res.counts[R.DROP_TAKEDOWN] == 4 and res.counts["kept"] == 2 and res.counts["image_links"] == 6
    assert res.per_file[str(wat)][R.DROP_TAKEDOWN] == 4
    for without in (None, B.CrawlBlocklist()):
        plain = extract_pairs([str(wat)], crawl="CC-MAIN-2024-51", segment="000", blocklist=without)
        assert plain.table.num_rows == 6 and plain.counts[R.DROP_TAKEDOWN] == 0


def test_stages_load_the_lakes_lists(tmp_path: Path) -> None:
    """materialize_pairs drops what the lists block at extraction; a list ingested later blocks the downloads of
    pairs already extracted, without a fetch (all are refused, so img2dataset never starts)."""
    crawl, lake_root, crawl_root = "CC-MAIN-2024-51", str(tmp_path / "lake"), tmp_path / "crawl"
    wat_rel = f"crawl-data/{crawl}/segments/1733066000000.0/wat/page.warc.wat.gz"
    (crawl_root / wat_rel).parent.mkdir(parents=True)
    _write_page(crawl_root / wat_rel)
    (crawl_root / f"crawl-data/{crawl}/wat.paths.gz").write_bytes(gzip.compress(f"{wat_rel}\n".encode()))
    _extraction_lists(lake_root)
    part = Partition(crawl, "000")

    pairs_report = materialize_pairs(lake_root, str(crawl_root), part)
    lake = Lake(lake_root)
    marker = json.loads(Path(lake.marker("pairs", part)).read_text())
    assert marker["rows"] == 2 and marker["counts"][R.DROP_TAKEDOWN] == 4
    assert "takedown" in pairs_report.metadata["dropped_by_reason"][1]

    ingest(lake_root, "later", "host img.example\n", "later.txt")
    report = materialize_downloads(lake_root, part, {})
    downloads = pq.read_table(lake.table("downloads", part)).to_pylist()
    assert [(r[R.STATUS], r[R.REASON], r[R.KEY]) for r in downloads] == [(R.STATUS_BLOCKED, "takedown:later", None)] * 2
    marker = json.loads(Path(lake.marker("downloads", part)).read_text())
    assert marker["blocked_by_takedown"] == 2 and marker["by_reason"] == {"takedown:later": 2}
    assert report.metadata["blocked_by_takedown"] == ("int", 2)
    assert cio.exists(lake.shards_dir(part))
