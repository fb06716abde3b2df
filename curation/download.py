"""The `downloads` stage core: fetch and resize images into webdataset shards with img2dataset.

img2dataset does the work (sharding, threaded downloads, resize, hashing, tar/parquet writing, the
multiprocessing distributor). Our policies plug in through its own extension points:

- `GuardedDownloader` subclasses img2dataset's `Downloader`; its `__call__` runs in each worker process
  and installs our guarded urllib opener as the process-global opener (`urllib.request.install_opener`),
  which img2dataset's `download_image` uses because it calls `urlopen` without a context. That opener
  (curation.netguard) carries the SSRF guard, the streaming body cap, the overall per-URL deadline,
  the refusal of encoded (gzip…) bodies, the per-host connection cap and the hop recorder whose
  per-shard side file gives `http_status` and `final_url`.
- `GuardedResizer` subclasses img2dataset's `Resizer`: it refuses bodies under `min_image_bytes`,
  unsupported formats and images over `max_image_pixels` from the image *header* (PIL lazy open),
  before img2dataset's resizer would decode the whole image. Large images with an alpha channel are
  flattened onto white in row bands first (see `flatten_alpha`): img2dataset does that on the whole
  image in float64, and a ~350 KB 9400x9400 RGBA PNG, under the pixel limit, peaked at 6.4 GB.
- X-Robots-Tag opt-out, user-agent token, timeout and retries are img2dataset's own options.
- Consent at crawl time (curation.consent, an extension of the guarded opener): each hop's origin's
  robots.txt, fetched once per origin and worker process through the same guard, and the TDMRep
  `tdm-reservation: 1` response header, refused before the body is read (`respect_robots_txt`,
  `respect_tdm_reservation`).

img2dataset's worker downloads with `threads` threads but resizes in the one thread that collects their
results, so decode memory is that of one image at a time (plus up to 2 x threads undecoded bodies).

Takedowns (curation.blocklist): a pair the crawl blocklist refuses (URL, host, uid, caption rule) is never handed
to img2dataset, so nothing of it is fetched, robots.txt included; it keeps its row, shard and key null. The
resizer hashes every original body (sha256, md5) and refuses a listed one, and refuses an image whose stored
(resized) version's pHash lies within a listed radius, before img2dataset writes anything: such a sample gets
no bytes in the tar, only its meta row. Either way the row is `blocked`, reason `takedown:<list>`. img2dataset
computes one hash (`sha256`); the resizer keeps sha256 -> md5 per shard in a side file next to the hop log, and
`md5` is joined on `sha256` (same bytes, same md5).

Status mapping (img2dataset status -> ours; `error` keeps img2dataset's `error_message`):
  an error starting `takedown:<list>` -> blocked, reason `takedown:<list>` (see above); success -> success;
  failed_to_resize -> failed_to_resize (undecodable body, or refused by the
  content rules: too small, wrong format, too many pixels); failed_to_download -> blocked when the
  reason is one of records.BLOCKED_REASONS: an SSRF/scheme block ("blocked: …", redirects to
  file:/gopher:… included), the X-Robots-Tag opt-out, robots.txt or a TDM reservation; else
  failed_to_download (network, HTTP error, truncated or oversized body, the per-URL deadline, an encoded
  body, too many redirects; also the URLs of a host whose robots.txt got no answer at all, with that
  failure's reason). A row with no img2dataset result at all (its shard crashed twice) is
  failed_to_download with error `NO_RESULT`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import shutil
import struct
import tempfile
import time
import urllib.request
import uuid
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import cv2
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from curation import records as R
from curation.blocklist import CrawlBlocklist, takedown_reason
from curation.consent import ROBOTS_MAX_BYTES, ROBOTS_PREFIX, TDM_PREFIX, ConsentPolicy
from curation.io import filesystem, is_local
from curation.layout import join
from curation.netguard import NetPolicy, install_process_guard
from curation.phash import phash_bytes

# albumentations (imported by img2dataset's resizer, here and in every spawned worker, which inherits
# this environment) phones home for updates on import unless this is set. Setting it is a write for the
# library we launch, not configuration read by us.
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"

from img2dataset.distributor import multiprocessing_distributor
from img2dataset.downloader import Downloader, compute_key
from img2dataset.reader import Reader
from img2dataset.resizer import ResizeMode, Resizer
from img2dataset.writer import WebDatasetSampleWriter

RESIZE_MODES = tuple(ResizeMode.__members__)
ENCODE_FORMATS = ("jpg", "png", "webp")
ROBOTS_ERROR = "Use of image disallowed by X-Robots-Tag directive"  # img2dataset's opt-out message
NO_RESULT = "no result: img2dataset shard failed"
SHARDS_DIR = "shards"
MD5_LOG_SUFFIX = ".md5.json"  # per-shard side file of sha256 -> md5, beside the hop log `<shard>.jsonl`
PAIR_TAKEDOWN_ERROR = "pair on a takedown list, never fetched"
OOM_SHARD_COUNT = 5  # shard names have 5 digits, as in img2dataset and the LAION releases
DEADLINE_TIMEOUTS = 3  # the default per-URL deadline, in multiples of timeout_s
FLATTEN_BAND_PIXELS = 1 << 20  # pixels per band when flattening alpha: ~30 MB of temporaries a band
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})  # PIL modes whose decode has an alpha channel

DOWNLOADS_SCHEMA = pa.schema([
    (R.UID, pa.int64()),
    (R.STATUS, pa.string()),
    (R.ERROR, pa.string()),
    (R.HTTP_STATUS, pa.int32()),
    (R.FINAL_URL, pa.string()),
    (R.ORIGINAL_WIDTH, pa.int32()),
    (R.ORIGINAL_HEIGHT, pa.int32()),
    (R.WIDTH, pa.int32()),
    (R.HEIGHT, pa.int32()),
    (R.SHA256, pa.string()),
    (R.MD5, pa.string()),
    (R.SHARD, pa.string()),
    (R.KEY, pa.string()),
    (R.REASON, pa.string()),
])

# A stable reason code per error string (errors carry addresses and sizes, reasons group them).
_REASON_PREFIXES: tuple[tuple[str, str], ...] = (
    ("blocked: ", R.REASON_SSRF_BLOCKED),
    (ROBOTS_ERROR, R.REASON_X_ROBOTS_TAG),
    (ROBOTS_PREFIX, R.REASON_ROBOTS_TXT),
    (TDM_PREFIX, R.REASON_TDM_RESERVATION),
    ("IncompleteRead", "truncated"),
    ("unsupported Content-Encoding", "unsupported_encoding"),
    ("body too small", "too_small"),
    ("body too large", "too_large"),
    ("too many pixels", "too_many_pixels"),
    ("not an image", "not_an_image"),
    ("unsupported image format", "unsupported_format"),
    ("Image decoding error", "decode_error"),
    ("too many redirects", "redirect_loop"),
    (NO_RESULT, "shard_failed"),
)


def classify_error(error: str | None) -> str | None:
    """The reason code of a download error string (None for no error)."""
    if error is None:
        return None
    if error.startswith(R.REASON_TAKEDOWN_PREFIX):  # `takedown:<list>: what`; list names hold no ':'
        return takedown_reason(error[len(R.REASON_TAKEDOWN_PREFIX):].split(":", 1)[0].strip())
    if error.startswith("HTTP Error "):
        code = error[len("HTTP Error "):].split(":", 1)[0].strip()
        if code in ("301", "302", "303", "307", "308") and "infinite loop" in error:
            return "redirect_loop"
        return f"http_{code}" if code.isdigit() else "http_error"
    for prefix, reason in _REASON_PREFIXES:
        if error.startswith(prefix):
            return reason
    low = error.lower()
    if "timed out" in low or "timeout" in low:
        return "timeout"
    if "connection refused" in low:
        return "connection_refused"
    if "name or service not known" in low or "nodename nor servname" in low or "getaddrinfo" in low:
        return "dns_error"
    return "other"


@dataclass(frozen=True)
class DownloadConfig:
    """How images are fetched, checked and resized. Defaults follow the LAION download rules."""

    image_size: int = 256
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_bytes: int = 5000  # LAION: reject bodies under 5000 bytes; 0 disables
    max_image_bytes: int = 32 * 1024 * 1024  # cut off while streaming
    max_image_pixels: int = 89_478_484  # LAION: PIL's MAX_IMAGE_PIXELS - 1, checked from the header
    allowed_formats: tuple[str, ...] = ("JPEG", "PNG", "WEBP")  # PIL format names; () allows any
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")
    user_agent_token: str = "curation"  # in the User-Agent header, and our group in robots.txt files
    respect_robots_txt: bool = True  # each origin's robots.txt, once per origin and worker (curation.consent)
    respect_tdm_reservation: bool = True  # refuse images served with `tdm-reservation: 1` (W3C TDMRep)
    robots_txt_max_bytes: int = ROBOTS_MAX_BYTES  # read at most this much of a robots.txt (RFC 9309: >= 500 KiB)
    timeout_s: float = 10.0  # per connect and per receive (img2dataset's timeout)
    # Overall limit per attempt at a URL: connect, redirects, headers and the whole body. A server that
    # trickles bytes just inside timeout_s is cut off here (reason `timeout`). None: 3 x timeout_s.
    # Each retry is a new attempt, so a URL can take (retries + 1) x deadline.
    deadline_s: float | None = None
    retries: int = 1
    max_connections_per_host: int | None = 4  # per worker process
    processes: int = 1
    threads: int = 32
    number_sample_per_shard: int = 10_000
    max_shard_retry: int = 1
    extract_exif: bool = False
    # Alpha images over this many pixels are flattened onto white in row bands (bit-identical output)
    # before img2dataset's resizer, whose whole-image float64 matting takes ~70 bytes per pixel.
    flatten_alpha_above_pixels: int = 1 << 20

    def __post_init__(self) -> None:
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.encode_format not in ENCODE_FORMATS:
            raise ValueError(f"encode_format must be one of {ENCODE_FORMATS}, got {self.encode_format!r}")
        if self.encode_format == "png" and not 0 <= self.encode_quality <= 9:
            raise ValueError(f"png encode_quality is a compression level 0-9, got {self.encode_quality}")
        if self.encode_format != "png" and not 0 <= self.encode_quality <= 100:
            raise ValueError(f"encode_quality must be in [0, 100], got {self.encode_quality}")
        if self.min_image_bytes < 0:
            raise ValueError(f"min_image_bytes must be >= 0, got {self.min_image_bytes}")
        if self.max_image_bytes <= max(self.min_image_bytes, 0):
            raise ValueError(f"max_image_bytes ({self.max_image_bytes}) must exceed min_image_bytes "
                             f"({self.min_image_bytes})")
        if self.max_image_pixels <= 0:
            raise ValueError(f"max_image_pixels must be positive, got {self.max_image_pixels}")
        if isinstance(self.allowed_formats, str) or isinstance(self.disallowed_header_directives, str):
            raise TypeError("allowed_formats and disallowed_header_directives are tuples of strings")
        if not self.user_agent_token or any(c in self.user_agent_token for c in ";()\r\n"):
            raise ValueError(f"user_agent_token must be a plain token, got {self.user_agent_token!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.robots_txt_max_bytes < 1:
            raise ValueError(f"robots_txt_max_bytes must be positive, got {self.robots_txt_max_bytes}")
        if self.deadline_s is not None and not self.deadline_s > 0:
            raise ValueError(f"deadline_s must be positive or None (3 x timeout_s), got {self.deadline_s}")
        if self.flatten_alpha_above_pixels < 0:
            raise ValueError(f"flatten_alpha_above_pixels must be >= 0, got {self.flatten_alpha_above_pixels}")
        if self.retries < 0 or self.max_shard_retry < 0:
            raise ValueError("retries and max_shard_retry must be >= 0")
        if self.max_connections_per_host is not None and self.max_connections_per_host < 1:
            raise ValueError(f"max_connections_per_host must be >= 1 or None, got "
                             f"{self.max_connections_per_host}")
        if self.processes < 1 or self.threads < 1:
            raise ValueError(f"processes and threads must be >= 1, got {self.processes}, {self.threads}")
        if not 1 <= self.number_sample_per_shard <= 10**8:
            raise ValueError(f"number_sample_per_shard must be in [1, 1e8], got "
                             f"{self.number_sample_per_shard}")

    @property
    def url_deadline_s(self) -> float:
        """The overall deadline per attempt at a URL: `deadline_s`, or DEADLINE_TIMEOUTS x timeout_s."""
        return self.deadline_s if self.deadline_s is not None else DEADLINE_TIMEOUTS * self.timeout_s

    def consent_policy(self) -> ConsentPolicy | None:
        """The consent checks to plug into the guarded opener, or None when both are off."""
        if not (self.respect_robots_txt or self.respect_tdm_reservation):
            return None
        return ConsentPolicy(user_agent_token=self.user_agent_token, user_agent=user_agent(self.user_agent_token),
                             robots_txt=self.respect_robots_txt, tdm_reservation=self.respect_tdm_reservation,
                             timeout_s=self.timeout_s, robots_max_bytes=self.robots_txt_max_bytes)


def user_agent(token: str) -> str:
    """The User-Agent header img2dataset's `download_image` sends for `token`: robots.txt requests send the
    same, so a site sees one crawler. Kept equal to img2dataset's by test_download."""
    return ("Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
            f" (compatible; {token.strip().lower()}; +https://github.com/rom1504/img2dataset)")


@dataclass(frozen=True)
class DownloadResult:
    """The per-sample `downloads` table plus run-level counts."""

    table: pa.Table
    counts_by_status: dict[str, int]
    counts_by_reason: dict[str, int]
    success_rate: float
    duration_s: float
    images_per_s: float


@dataclass(frozen=True)
class ImageHeader:
    """What PIL's lazy open tells about an image without decoding it."""

    format: str | None
    width: int
    height: int
    has_alpha: bool  # a guess from the mode and a tRNS chunk: the decoder has the last word


def read_header(data: BinaryIO, *, min_image_bytes: int, max_image_pixels: int,
                allowed_formats: tuple[str, ...]) -> str | ImageHeader:
    """The LAION content rules judged from a body's size and image header only: a refusal or the header.

    PIL's `Image.open` is lazy: it parses the header for format and size and decodes no pixel data, so a
    decompression bomb costs a few bytes of reading. Returns the refusal reason or the header.
    """
    data.seek(0, os.SEEK_END)
    size = data.tell()
    data.seek(0)
    if size < min_image_bytes:
        return f"body too small: {size} bytes < {min_image_bytes}"
    try:
        with Image.open(data) as im:
            fmt, (width, height) = im.format, im.size
            has_alpha = im.mode in ALPHA_MODES or "transparency" in im.info
    except Image.DecompressionBombError as err:  # over twice PIL's limit: PIL refuses to even open it
        return f"too many pixels: {err}"
    except UnidentifiedImageError:
        return "not an image: unrecognised format"
    except Exception as err:
        return f"not an image: {err}"
    finally:
        data.seek(0)
    if allowed_formats and fmt not in allowed_formats:
        return f"unsupported image format {fmt}"
    if width * height > max_image_pixels:
        return f"too many pixels: {width}x{height} = {width * height} > {max_image_pixels}"
    return ImageHeader(fmt, width, height, has_alpha)


def header_refusal(data: BinaryIO, *, min_image_bytes: int, max_image_pixels: int,
                   allowed_formats: tuple[str, ...]) -> str | None:
    """Why the LAION content rules refuse this body (see `read_header`), or None to accept it."""
    header = read_header(data, min_image_bytes=min_image_bytes, max_image_pixels=max_image_pixels,
                         allowed_formats=allowed_formats)
    return header if isinstance(header, str) else None


def _matte(alpha: Any, color: Any) -> Any:
    """img2dataset's matting onto white, operation for operation (float64): uint8 BGR out."""
    return np.rint((alpha / 255 * color + 255 - alpha).clip(min=0, max=255)).astype(np.uint8)


@functools.cache
def _matte_table() -> Any:
    """`_matte` for every 8-bit (alpha, channel) pair, indexed by alpha << 8 | channel.

    Computed by `_matte` itself, so a lookup gives exactly its result, ~4x faster than the float64 math.
    """
    return _matte(np.arange(256, dtype=np.uint8)[:, None], np.arange(256, dtype=np.uint8)[None, :]).ravel()


def flatten_alpha(data: bytes, band_pixels: int = FLATTEN_BAND_PIXELS) -> bytes | None:
    """An image with an alpha channel flattened onto white, as an uncompressed BMP; None without alpha.

    Decodes as img2dataset's resizer does (cv2, IMREAD_UNCHANGED) and applies its matting formula
    (`_matte`, by table for 8-bit images) band by band, so feeding the BMP to its resizer gives
    byte-identical output. Peak memory is the decoded image plus the BMP (~7 bytes per pixel for 8-bit
    RGBA) instead of the ~70 bytes per pixel of img2dataset matting the whole image in float64.
    """
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.ndim != 3 or img.shape[2] != 4:
        return None
    height, width = img.shape[:2]
    row_bytes = (3 * width + 3) & ~3  # BMP rows are padded to 4 bytes
    header = (struct.pack("<2sIHHI", b"BM", 54 + row_bytes * height, 0, 0, 54)
              + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, row_bytes * height, 2835, 2835, 0, 0))
    bmp = np.zeros(len(header) + row_bytes * height, np.uint8)
    bmp[:len(header)] = np.frombuffer(header, np.uint8)
    rows = bmp[len(header):].reshape(height, row_bytes)[::-1, :3 * width]  # BMP stores rows bottom-up
    table = _matte_table() if img.dtype == np.uint8 else None
    step = max(1, band_pixels // width)
    for top in range(0, height, step):
        band: Any = img[top:top + step]
        if table is not None:
            flat = table[(band[:, :, 3:4].astype(np.intp) << 8) | band[:, :, :3]]
        else:  # 16-bit: img2dataset's float64 formula as it stands
            flat = _matte(band[:, :, 3, np.newaxis], band[..., :3])
        rows[top:top + step] = flat.reshape(len(band), 3 * width)
    del img
    return bmp.tobytes()


def takedown_error(list_name: str, what: str) -> str:
    """The error text of a sample a takedown list refused: `takedown:<list>: what` (classify_error reads the list)."""
    return f"{takedown_reason(list_name)}: {what}"


class GuardedResizer(Resizer):
    """img2dataset's Resizer behind the takedown hashes and the header-only content rules (size, format, pixels).

    Every original body is hashed (sha256, md5): a body a takedown list names by either hash is refused before
    anything else, and the md5 is kept in `md5_by_sha256` for the downloads table (the downloader drains it per
    shard). When the blocklist has pHash entries, the resized, encoded output (what the shard would store, what
    clip's `phash` is computed on) is hashed too and refused within a listed radius. A refusal is an error
    message, so img2dataset writes no image bytes for it.

    Images the header says have alpha and more than `flatten_alpha_above_pixels` pixels reach it
    flattened (`flatten_alpha`): the same output at a seventh of the peak memory (9400x9400 RGBA:
    0.9 GB over the worker's baseline instead of 6.4 GB) and in half the time.
    """

    def __init__(self, *, min_image_bytes: int, max_image_pixels: int, allowed_formats: tuple[str, ...],
                 flatten_alpha_above_pixels: int = 1 << 20, blocklist: CrawlBlocklist | None = None,
                 **resizer_kwargs: Any) -> None:
        super().__init__(**resizer_kwargs)
        self.min_image_bytes = min_image_bytes
        self.max_image_pixels = max_image_pixels
        self.allowed_formats = allowed_formats
        self.flatten_alpha_above_pixels = flatten_alpha_above_pixels
        self.blocklist = blocklist if blocklist is not None and blocklist.has_image_rules else None
        self.md5_by_sha256: dict[str, str] = {}

    def __call__(self, img_stream: BinaryIO, blurring_bbox_list: Any = None) -> tuple[Any, ...]:
        body = img_stream.read()  # a BytesIO built from bytes hands them back without a copy
        img_stream.seek(0)
        sha256, md5 = hashlib.sha256(body).hexdigest(), hashlib.md5(body, usedforsecurity=False).hexdigest()
        del body
        if self.blocklist is not None:
            listed = self.blocklist.refuse_image(sha256=sha256, md5=md5)
            if listed is not None:
                return None, None, None, None, None, takedown_error(listed, "image hash on a takedown list")
        out = self._resize(img_stream, blurring_bbox_list)
        if out[-1] is None and self.blocklist is not None and self.blocklist.phash:
            hashes, errors = phash_bytes([out[0]])
            # An output Pillow cannot hash is left to clip, which reports it as undecodable.
            listed = self.blocklist.refuse_image(phash=int(hashes[0])) if errors[0] is None else None
            if listed is not None:
                return None, None, None, None, None, takedown_error(listed, "image pHash near a takedown entry")
        if out[-1] is None:
            self.md5_by_sha256[sha256] = md5
        return out

    def _resize(self, img_stream: BinaryIO, blurring_bbox_list: Any) -> tuple[Any, ...]:
        header = read_header(img_stream, min_image_bytes=self.min_image_bytes,
                             max_image_pixels=self.max_image_pixels, allowed_formats=self.allowed_formats)
        if isinstance(header, str):
            return None, None, None, None, None, header
        if header.has_alpha and header.width * header.height > self.flatten_alpha_above_pixels:
            try:
                flat = flatten_alpha(img_stream.read())
            except Exception as err:  # an undecodable body: the same outcome img2dataset would give
                return None, None, None, None, None, str(err)
            finally:
                img_stream.seek(0)
            if flat is not None:  # BytesIO shares the bytes and read() hands them back without a copy
                return super().__call__(io.BytesIO(flat), blurring_bbox_list)
        return super().__call__(img_stream, blurring_bbox_list)


class GuardedDownloader(Downloader):
    """img2dataset's Downloader, run with our guarded opener installed in the worker process.

    After each shard it writes the hop records (original URL -> http_status, final_url, block reason)
    to `<netlog_dir>/<shard>.jsonl` and the resizer's sha256 -> md5 map to `<netlog_dir>/<shard>.md5.json`;
    a retried shard overwrites its files.
    """

    def __init__(self, *, policy: NetPolicy, max_body_bytes: int, max_connections_per_host: int | None,
                 netlog_dir: str, deadline_s: float | None = None, consent: ConsentPolicy | None = None,
                 **downloader_kwargs: Any) -> None:
        super().__init__(**downloader_kwargs)
        self.policy = policy
        self.consent = consent
        self.max_body_bytes = max_body_bytes
        self.max_connections_per_host = max_connections_per_host
        self.deadline_s = deadline_s
        self.netlog_dir = netlog_dir

    def __call__(self, row: tuple[int, str]) -> tuple[bool, tuple[int, str]]:
        guard = install_process_guard(self.policy, max_body_bytes=self.max_body_bytes,
                                      max_connections_per_host=self.max_connections_per_host,
                                      deadline_s=self.deadline_s,
                                      extensions=() if self.consent is None else (self.consent,))
        # Our header check already refuses oversized images; PIL's warning about them is noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        guard.recorder.drain()  # a worker handles one shard at a time: start it clean
        md5s: dict[str, str] = self.resizer.md5_by_sha256 if isinstance(self.resizer, GuardedResizer) else {}
        md5s.clear()
        result: tuple[bool, tuple[int, str]] = super().__call__(row)
        stem = os.path.join(self.netlog_dir, f"{row[0]:0{OOM_SHARD_COUNT}d}")
        _write_replacing(f"{stem}.jsonl", "".join(json.dumps(rec) + "\n" for rec in guard.recorder.drain()))
        _write_replacing(f"{stem}{MD5_LOG_SUFFIX}", json.dumps(md5s))
        md5s.clear()
        return result


def _write_replacing(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _request_url(url: str | None) -> str | None:
    """The URL as urllib's Request spells it (how the hop recorder keys it)."""
    if url is None:
        return None
    try:
        return str(urllib.request.Request(url).full_url)
    except ValueError:
        return url


def _load_pairs(pairs: pa.Table | str) -> pa.Table:
    if isinstance(pairs, str):
        fs, path = filesystem(pairs)
        table = pq.read_table(path, columns=[R.UID, R.URL, R.TEXT], filesystem=fs)
    else:
        missing = {R.UID, R.URL, R.TEXT} - set(pairs.column_names)
        if missing:
            raise ValueError(f"pairs table lacks columns {sorted(missing)}; it needs uid, url, text")
        table = pairs.select([R.UID, R.URL, R.TEXT])
    try:
        return table.cast(pa.schema([(R.UID, pa.int64()), (R.URL, pa.string()), (R.TEXT, pa.string())]))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ValueError(f"pairs columns must be uid:int64, url:string, text:string ({err})") from None


def _build_downloader(config: DownloadConfig, policy: NetPolicy, column_list: list[str], output_folder: str,
                      netlog_dir: str, blocklist: CrawlBlocklist | None = None) -> GuardedDownloader:
    # Only the image rules travel: the downloader is pickled with every shard, and the pair rules were
    # applied before img2dataset saw the pairs.
    image_rules = (CrawlBlocklist(image_sha256=blocklist.image_sha256, image_md5=blocklist.image_md5,
                                  phash=blocklist.phash)
                   if blocklist is not None and blocklist.has_image_rules else None)
    resizer = GuardedResizer(
        min_image_bytes=config.min_image_bytes,
        max_image_pixels=config.max_image_pixels,
        allowed_formats=config.allowed_formats,
        flatten_alpha_above_pixels=config.flatten_alpha_above_pixels,
        blocklist=image_rules,
        image_size=config.image_size,
        resize_mode=config.resize_mode,
        resize_only_if_bigger=config.resize_only_if_bigger,
        encode_quality=config.encode_quality,
        encode_format=config.encode_format,
    )
    return GuardedDownloader(
        policy=policy,
        max_body_bytes=config.max_image_bytes,
        max_connections_per_host=config.max_connections_per_host,
        deadline_s=config.url_deadline_s,
        consent=config.consent_policy(),
        netlog_dir=netlog_dir,
        sample_writer_class=WebDatasetSampleWriter,
        resizer=resizer,
        thread_count=config.threads,
        save_caption=True,
        extract_exif=config.extract_exif,
        output_folder=output_folder,
        column_list=column_list,
        timeout=config.timeout_s,
        number_sample_per_shard=config.number_sample_per_shard,
        oom_shard_count=OOM_SHARD_COUNT,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format=config.encode_format,
        retries=config.retries,
        user_agent_token=config.user_agent_token,
        disallowed_header_directives=list(config.disallowed_header_directives) or None,
    )


def _read_netlogs(netlog_dir: str) -> pl.DataFrame:
    rows: list[dict[str, Any]] = []
    for name in sorted(os.listdir(netlog_dir)):
        if name.endswith(".jsonl"):
            shard = name.removesuffix(".jsonl")
            with open(os.path.join(netlog_dir, name), encoding="utf-8") as f:
                rows.extend({**json.loads(line), "shard": shard} for line in f if line.strip())
    schema = pl.Schema({"shard": pl.String, "url": pl.String, "final_url": pl.String,
                        "http_status": pl.Int32, "blocked": pl.String})
    if not rows:
        return pl.DataFrame(schema=schema)
    return pl.DataFrame(rows, schema=schema).unique(["shard", "url"], keep="last", maintain_order=True)


def _read_md5s(netlog_dir: str) -> pl.DataFrame:
    md5_by_sha256: dict[str, str] = {}
    for name in sorted(os.listdir(netlog_dir)):
        if name.endswith(MD5_LOG_SUFFIX):
            with open(os.path.join(netlog_dir, name), encoding="utf-8") as f:
                md5_by_sha256.update(json.load(f))
    return pl.DataFrame({"sha256": list(md5_by_sha256), R.MD5: list(md5_by_sha256.values())},
                        schema={"sha256": pl.String, R.MD5: pl.String})


def build_downloads_table(pairs: pa.Table, shards_dir: str, netlog_dir: str, number_sample_per_shard: int,
                          refused: list[str | None] | None = None) -> pa.Table:
    """One `downloads` row per input pair, in input order, from img2dataset's shard parquets + hop and md5 logs.

    `refused` names, per pair, the takedown list that kept it from img2dataset (None: handed over); img2dataset
    numbered only the pairs handed over, so keys count those alone, and a refused pair gets no shard or key."""
    n = number_sample_per_shard
    oom = math.ceil(math.log10(n))
    refused = [None] * pairs.num_rows if refused is None else refused
    if len(refused) != pairs.num_rows:
        raise ValueError(f"refused has {len(refused)} entries for {pairs.num_rows} pairs")
    shards: list[str | None] = []
    keys: list[str | None] = []
    i = 0  # the pair's position in what img2dataset got
    for listed in refused:
        if listed is None:
            shards.append(f"{i // n:0{OOM_SHARD_COUNT}d}")
            keys.append(compute_key(i % n, i // n, oom, OOM_SHARD_COUNT))
            i += 1
        else:
            shards.append(None)
            keys.append(None)
    expected = pl.DataFrame({
        R.UID: pairs.column(R.UID).to_pylist(),
        "_url": [_request_url(u) for u in pairs.column(R.URL).to_pylist()],
        R.SHARD: shards,
        R.KEY: keys,
        "_refused": refused,
    }, schema={R.UID: pl.Int64, "_url": pl.String, R.SHARD: pl.String, R.KEY: pl.String, "_refused": pl.String})

    fs, root = filesystem(shards_dir)
    cols = ["key", "status", "error_message", "width", "height", "original_width", "original_height",
            "sha256"]
    parts = [pq.read_table(p, columns=cols, filesystem=fs) for p in sorted(fs.glob(f"{root}/*.parquet"))]
    i2d_schema = pl.Schema({"key": pl.String, "status": pl.String, "error_message": pl.String,
                            "width": pl.Int32, "height": pl.Int32, "original_width": pl.Int32,
                            "original_height": pl.Int32, "sha256": pl.String})
    frames = [cast(pl.DataFrame, pl.from_arrow(t)).cast(i2d_schema) for t in parts]
    i2d = (pl.concat(frames) if frames else pl.DataFrame(schema=i2d_schema)).unique("key", keep="last")
    hops = _read_netlogs(netlog_dir).rename({"url": "_url", "shard": R.SHARD})

    i2d_status = pl.col("_i2d_status")
    status = (pl.when(pl.col(R.REASON).str.starts_with(R.REASON_TAKEDOWN_PREFIX)).then(pl.lit(R.STATUS_BLOCKED))
              .when(i2d_status.is_null()).then(pl.lit(R.STATUS_FAILED_DOWNLOAD))
              .when(i2d_status == "success").then(pl.lit(R.STATUS_SUCCESS))
              .when(i2d_status == "failed_to_resize").then(pl.lit(R.STATUS_FAILED_RESIZE))
              .when(pl.col(R.REASON).is_in(R.BLOCKED_REASONS)).then(pl.lit(R.STATUS_BLOCKED))
              .otherwise(pl.lit(R.STATUS_FAILED_DOWNLOAD)))
    out = (expected.join(i2d, left_on=R.KEY, right_on="key", how="left", maintain_order="left")
           .join(hops, on=[R.SHARD, "_url"], how="left", maintain_order="left")
           .join(_read_md5s(netlog_dir), on="sha256", how="left", maintain_order="left")
           .select(
               pl.col(R.UID),
               pl.col("status").alias("_i2d_status"),
               pl.when(pl.col("_refused").is_not_null())
                 .then(pl.lit(R.REASON_TAKEDOWN_PREFIX) + pl.col("_refused") + pl.lit(f": {PAIR_TAKEDOWN_ERROR}"))
                 .when(pl.col("status").is_null()).then(pl.lit(NO_RESULT))
                 .when(pl.col("status") == "success").then(pl.lit(None, pl.String))
                 .otherwise(pl.col("error_message")).alias(R.ERROR),
               pl.col("http_status").alias(R.HTTP_STATUS),
               pl.col("final_url").alias(R.FINAL_URL),
               pl.col("original_width").alias(R.ORIGINAL_WIDTH),
               pl.col("original_height").alias(R.ORIGINAL_HEIGHT),
               pl.col("width").alias(R.WIDTH),
               pl.col("height").alias(R.HEIGHT),
               pl.col("sha256").alias(R.SHA256),
               pl.col(R.MD5),
               pl.col(R.SHARD),
               pl.col(R.KEY),
           ))
    out = out.with_columns(pl.col(R.ERROR).map_elements(classify_error, return_dtype=pl.String).alias(R.REASON))
    out = out.with_columns(status.alias(R.STATUS)).select(DOWNLOADS_SCHEMA.names)
    return out.to_arrow().cast(DOWNLOADS_SCHEMA)


def _replace_dir(new: str, final: str) -> None:
    """Put folder `new` at `final`, replacing whatever was there (rename on local disks)."""
    fs, final_p = filesystem(final)
    _, new_p = filesystem(new)
    if is_local(final):
        old = f"{final_p}.old-{uuid.uuid4().hex}"
        if os.path.exists(final_p):
            os.rename(final_p, old)
        os.rename(new_p, final_p)
        shutil.rmtree(old, ignore_errors=True)
    else:  # object stores have no directory rename: remove, then move the new tree in
        if fs.exists(final_p):
            fs.rm(final_p, recursive=True)
        fs.mv(new_p, final_p, recursive=True)


def download_images(pairs: pa.Table | str, out_dir: str, config: DownloadConfig, policy: NetPolicy,
                    blocklist: CrawlBlocklist | None = None) -> DownloadResult:
    """Download, check and resize the images of `pairs` (uid, url, text) into `<out_dir>/shards`.

    Runs img2dataset (webdataset output, multiprocessing distributor) into a staging folder inside
    `out_dir`, builds the `downloads` table (one row per input pair, failures included, see
    DOWNLOADS_SCHEMA), then swaps the staging shards in, so a rerun replaces the previous shards
    exactly. The table is returned, not written: the caller owns `downloads.parquet`.
    With a `blocklist`, refused pairs are never fetched and listed images never stored (module docstring).
    """
    started = time.perf_counter()
    table = _load_pairs(pairs)
    refused: list[str | None] = [None] * table.num_rows
    if blocklist is not None and not blocklist.empty:
        refused = [blocklist.refuse_pair(uid, url, text) for uid, url, text in
                   zip(*(table.column(c).to_pylist() for c in (R.UID, R.URL, R.TEXT)), strict=True)]
    fetched = table.filter(pa.array([r is None for r in refused], pa.bool_())) if any(refused) else table
    fs, out_p = filesystem(out_dir)
    fs.makedirs(out_p, exist_ok=True)
    for stale in fs.glob(f"{out_p}/.staging-*") + fs.glob(f"{out_p}/{SHARDS_DIR}.old-*"):
        fs.rm(stale, recursive=True)  # leftovers of an interrupted run
    staging = join(out_dir, f".staging-{uuid.uuid4().hex}")
    staging_shards = join(staging, SHARDS_DIR)
    fs.makedirs(filesystem(staging_shards)[1], exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="curation-download-") as work:
            input_path = os.path.join(work, "pairs.parquet")
            pq.write_table(fetched, input_path)
            netlog_dir = os.path.join(work, "netlog")
            os.makedirs(netlog_dir)
            if fetched.num_rows:
                os.makedirs(os.path.join(work, "reader"))
                reader = Reader(input_path, "parquet", R.URL, R.TEXT, None, None, [R.UID],
                                config.number_sample_per_shard, set(), os.path.join(work, "reader"), 0)
                downloader = _build_downloader(config, policy, reader.column_list, staging_shards,
                                               netlog_dir, blocklist)
                multiprocessing_distributor(config.processes, downloader, reader, None,
                                            config.max_shard_retry)
            downloads = build_downloads_table(table, staging_shards, netlog_dir,
                                              config.number_sample_per_shard, refused)
        _replace_dir(staging_shards, join(out_dir, SHARDS_DIR))
    finally:
        if fs.exists(filesystem(staging)[1]):
            fs.rm(filesystem(staging)[1], recursive=True)
    return summarize(downloads, time.perf_counter() - started)


def summarize(downloads: pa.Table, duration_s: float) -> DownloadResult:
    """Counts by status and error, success rate and throughput of a `downloads` table."""
    statuses = Counter(downloads.column(R.STATUS).to_pylist())
    errors = Counter(e for e in downloads.column(R.REASON).to_pylist() if e is not None)
    n = downloads.num_rows
    ok = statuses.get(R.STATUS_SUCCESS, 0)
    return DownloadResult(
        table=downloads,
        counts_by_status=dict(statuses),
        counts_by_reason=dict(errors.most_common()),
        success_rate=ok / n if n else 0.0,
        duration_s=duration_s,
        images_per_s=ok / duration_s if duration_s > 0 else 0.0,
    )


def verify_shards(downloads: pa.Table, shards_dir: str) -> list[str]:
    """Problems between a `downloads` table and its webdataset shards (empty when consistent).

    Every success row must have exactly its `<key>.jpg/.txt/.json` in its shard's tar, and the tars
    must hold nothing else; every tar must open.
    """
    import tarfile

    fs, root = filesystem(shards_dir)
    expected: dict[str, set[str]] = {}
    for row in downloads.select([R.STATUS, R.SHARD, R.KEY]).to_pylist():
        if row[R.STATUS] == R.STATUS_SUCCESS:
            expected.setdefault(row[R.SHARD], set()).add(row[R.KEY])
    problems: list[str] = []
    tars = {str(p).rsplit("/", 1)[-1].removesuffix(".tar"): str(p) for p in fs.glob(f"{root}/*.tar")}
    for shard in sorted(set(expected) | set(tars)):
        want = expected.get(shard, set())
        if shard not in tars:
            problems.append(f"shard {shard}: {len(want)} successes but no tar")
            continue
        try:
            with fs.open(tars[shard], "rb") as f, tarfile.open(fileobj=f) as tar:
                names = tar.getnames()
        except (tarfile.TarError, OSError) as exc:
            problems.append(f"shard {shard}: tar unreadable ({exc})")
            continue
        got: dict[str, set[str]] = {}
        for name in names:
            key, _, ext = name.partition(".")
            got.setdefault(key, set()).add(ext)
        if set(got) != want:
            problems.append(f"shard {shard}: {len(set(got) - want)} keys in the tar not in the table, "
                            f"{len(want - set(got))} successes missing from the tar")
        incomplete = [k for k, exts in got.items() if not {"jpg", "txt", "json"} <= exts]
        if incomplete:
            problems.append(f"shard {shard}: {len(incomplete)} samples lack jpg/txt/json (e.g. {incomplete[0]})")
    return problems
