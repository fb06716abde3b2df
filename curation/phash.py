"""Perceptual hashes (pHash) of images, bit-identical to `imagehash.phash`, computed in batches and in parallel.

The definition is imagehash's (4.3.2, hash_size=8, highfreq_factor=4): `convert("L")`, a 32x32 LANCZOS resize,
`scipy.fftpack.dct` along axis 0 then axis 1, the top-left 8x8 block, bits = coefficient > median, the bits
read row-major with the first one as the most significant, written as 16 lowercase hex digits.

Where the time goes, and why this module stays exact rather than fast at any price: decoding, `convert("L")`
and the LANCZOS resize are ~90% of imagehash's time, and none of them can change without changing bits. A JPEG
DCT-domain draft decode makes JPEGs ~5x cheaper but changed 27% of the hashes in benchmarks/bench_phash.py's
mix; a numpy matrix-product copy of Pillow's fixed-point resize is exact but at most ~1.5x faster on the
resize alone and hangs on Pillow internals (Pillow 13 picks the pass order from the aspect ratio). So per core
this runs at about imagehash's speed, and the gain is parallelism: workers over chunks of files, each chunk
hashed with one batched DCT + median + bit packing instead of scipy calls and ImageHash objects per image.
`scipy.fftpack.dct` is kept (not a cosine-matrix product) because its floats are what imagehash compares: on
flat or mirror-symmetric images many coefficients equal the median up to rounding noise, and only the same
transform reproduces that noise bit for bit (a matrix product disagrees there).
Like imagehash, no EXIF orientation is applied: a rotated copy is a different image here.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image
from scipy import fftpack

from curation import records as R

if TYPE_CHECKING:
    import pyarrow as pa

HASH_SIZE = 8  # imagehash's default hash_size: 8x8 = 64 bits
HIGHFREQ_FACTOR = 4  # imagehash's default: the DCT runs on a (8*4)x(8*4) thumbnail
IMG_SIZE = HASH_SIZE * HIGHFREQ_FACTOR
HEX_DIGITS = HASH_SIZE * HASH_SIZE // 4

# Output columns of `write_hashes` (one row per input file).
PATH = "path"


@dataclass(frozen=True)
class PhashConfig:
    """How `phash_files` splits work; the hash definition itself is fixed (see the module docstring).

    chunk_size: files per worker task; large enough to amortise inter-process traffic, small enough that a
        worker holds few decoded images at once and the pool stays balanced.
    executor: "thread" (no start-up cost; Pillow releases the GIL while decoding, converting and resizing, so
        threads overlap) or "process" (spawned processes: no GIL at all, for many-core nodes and small images,
        but each worker pays ~1 s of imports before its first image).
    extensions: file suffixes (lowercase, with the dot) that `find_images` picks up inside directories.
    """

    chunk_size: int = 32
    executor: Literal["thread", "process"] = "thread"
    extensions: tuple[str, ...] = tuple(f".{ext}" for ext in R.IMAGE_EXTENSIONS)

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.executor not in ("thread", "process"):
            raise ValueError(f"executor must be 'thread' or 'process', got {self.executor!r}")
        bad = [e for e in self.extensions if not e.startswith(".") or e != e.lower()]
        if bad:
            raise ValueError(f"extensions must be lowercase and start with '.', got {bad}")


def to_hex(h: int | np.uint64) -> str:
    """A 64-bit hash as imagehash's `str(ImageHash)`: 16 lowercase hex digits, zero-padded. Negative values are
    the same bits stored as int64 (as the lake's parquet tables hold them)."""
    value = int(h)
    if -(1 << 63) <= value < 0:
        value += 1 << 64
    if not 0 <= value < 1 << 64:
        raise ValueError(f"not a 64-bit hash: {value}")
    return f"{value:0{HEX_DIGITS}x}"


def from_hex(s: str) -> int:
    """The 64-bit integer of a 16-digit hex hash (imagehash's `str(ImageHash)`, either case)."""
    if len(s) != HEX_DIGITS or any(c not in "0123456789abcdefABCDEF" for c in s):
        raise ValueError(f"not a {HEX_DIGITS}-digit hex hash: {s!r}")
    return int(s, 16)


def thumbnail(image: Image.Image) -> np.ndarray:
    """imagehash's pHash input: the image in mode L, resized to 32x32 with LANCZOS, as a uint8 array."""
    small = image.convert("L").resize((IMG_SIZE, IMG_SIZE), Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.uint8)


def hash_thumbnails(thumbs: np.ndarray) -> np.ndarray:
    """pHashes of a stack of 32x32 uint8 thumbnails [n, 32, 32]: uint64 [n], bit 63 = imagehash's first bit."""
    if thumbs.ndim != 3 or thumbs.shape[1:] != (IMG_SIZE, IMG_SIZE):
        raise ValueError(f"expected thumbnails of shape [n, {IMG_SIZE}, {IMG_SIZE}], got {thumbs.shape}")
    if len(thumbs) == 0:
        return np.zeros(0, dtype=np.uint64)
    # The same calls as imagehash, on a batch: axis 1/2 here are its axis 0/1, and the floats come out identical.
    dct = fftpack.dct(fftpack.dct(thumbs, axis=1), axis=2)
    low = dct[:, :HASH_SIZE, :HASH_SIZE].reshape(len(thumbs), HASH_SIZE * HASH_SIZE)
    bits = low > np.median(low, axis=1)[:, None]
    return np.packbits(bits, axis=1, bitorder="big").view(">u8").ravel().astype(np.uint64)


def phash_images(images: Sequence[Image.Image]) -> np.ndarray:
    """pHashes of PIL images (any mode Pillow can convert to L): uint64 [len(images)], same order.

    Errors (e.g. an image that cannot be loaded) propagate: these are caller-owned objects, not records.
    """
    thumbs = np.zeros((len(images), IMG_SIZE, IMG_SIZE), dtype=np.uint8)
    for i, image in enumerate(images):
        thumbs[i] = thumbnail(image)
    return hash_thumbnails(thumbs)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def phash_bytes(blobs: Sequence[bytes]) -> tuple[np.ndarray, list[str | None]]:
    """pHashes of encoded images: (uint64 [n], errors [n]); a blob that does not decode gets hash 0 and an error."""
    thumbs = np.zeros((len(blobs), IMG_SIZE, IMG_SIZE), dtype=np.uint8)
    errors: list[str | None] = [None] * len(blobs)
    for i, blob in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(blob)) as image:
                thumbs[i] = thumbnail(image)
        except Exception as exc:  # a broken record, whatever Pillow raised for it, becomes data
            errors[i] = _describe(exc)
    hashes = hash_thumbnails(thumbs)
    hashes[[i for i, e in enumerate(errors) if e is not None]] = 0
    return hashes, errors


def _phash_chunk(paths: Sequence[str]) -> tuple[np.ndarray, list[str | None]]:
    blobs: list[bytes] = []
    read_errors: list[str | None] = []
    for path in paths:
        try:
            blobs.append(Path(path).read_bytes())
            read_errors.append(None)
        except OSError as exc:
            blobs.append(b"")
            read_errors.append(_describe(exc))
    hashes, errors = phash_bytes(blobs)
    return hashes, [r if r is not None else e for r, e in zip(read_errors, errors, strict=True)]


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def phash_files(
    paths: Sequence[str | os.PathLike[str]], *, workers: int, config: PhashConfig | None = None
) -> tuple[np.ndarray, list[str | None]]:
    """pHashes of image files: (uint64 [n], errors [n]) in input order; unreadable or broken files get an error.

    A file's hash is 0 when its error is set (0 is also the valid hash of an all-black image: read the errors).
    workers <= 1 runs in this process; more runs that many workers of `config.executor` (processes are spawned,
    not forked, so threaded callers are safe), each reading, decoding and hashing `config.chunk_size` files a task.
    """
    config = config or PhashConfig()
    names = [os.fspath(p) for p in paths]
    if workers <= 1 or len(names) <= config.chunk_size:
        return _phash_chunk(names)
    pool: Executor
    if config.executor == "process":
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
    else:
        pool = ThreadPoolExecutor(max_workers=workers)
    hashes: list[np.ndarray] = []
    errors: list[str | None] = []
    with pool:
        for chunk_hashes, chunk_errors in pool.map(_phash_chunk, _chunks(names, config.chunk_size)):
            hashes.append(chunk_hashes)
            errors.extend(chunk_errors)
    return np.concatenate(hashes), errors


def hashes_table(paths: Sequence[str], hashes: np.ndarray, errors: Sequence[str | None]) -> pa.Table:
    """The `write_hashes` table: path, phash (hex, null on error), error (null when fine); all strings."""
    import pyarrow as pa  # here, not at the top: spawned hashing workers never need it

    hexes = [None if e is not None else to_hex(h) for h, e in zip(hashes.tolist(), errors, strict=True)]
    schema = pa.schema([(PATH, pa.string()), (R.PHASH, pa.string()), (R.ERROR, pa.string())])
    return pa.table({PATH: list(paths), R.PHASH: hexes, R.ERROR: list(errors)}, schema=schema)


def write_hashes(
    paths: Sequence[str | os.PathLike[str]],
    out_parquet: str,
    *,
    workers: int = 1,
    config: PhashConfig | None = None,
) -> pa.Table:
    """Hash files and write one row per file to `out_parquet` (atomically): path, phash, error. Returns the table."""
    from curation import io as lake_io

    names = [os.fspath(p) for p in paths]
    hashes, errors = phash_files(names, workers=workers, config=config)
    table = hashes_table(names, hashes, errors)
    lake_io.write_parquet(table, out_parquet)
    return table


def find_images(paths: Iterable[str | os.PathLike[str]], config: PhashConfig | None = None) -> list[str]:
    """Files named directly, plus every file under named directories with an image suffix, sorted per directory.

    Raises FileNotFoundError for a path that does not exist (a wrong argument, not a bad record).
    """
    config = config or PhashConfig()
    found: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(
                str(p) for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in config.extensions
            )
        elif path.exists():
            found.append(str(path))
        else:
            raise FileNotFoundError(f"no such file or directory: {path}")
    return found


def _phash_command(args: argparse.Namespace) -> int:
    try:
        paths = find_images(args.paths)
    except FileNotFoundError as exc:
        print(f"curation phash: {exc}", file=sys.stderr)
        return 2
    config = PhashConfig(executor=args.executor)
    if not paths:
        print(f"curation phash: no image files found (looked for {', '.join(config.extensions)})", file=sys.stderr)
        return 2
    output = str(Path(args.output).absolute()) if "://" not in args.output else args.output
    table = write_hashes(paths, output, workers=args.workers, config=config)
    hashed = table.column(R.ERROR).null_count
    print(json.dumps({"files": table.num_rows, "hashed": hashed, "errors": table.num_rows - hashed, "output": output}))
    return 0


def add_phash_parser(sub: argparse._SubParsersAction) -> None:
    """Register `phash PATH... -o OUT [--workers N] [--executor thread|process]` on a subparsers object."""
    p = sub.add_parser("phash", help="pHash image files (imagehash-identical) into a parquet: path, phash, error")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, or directories searched recursively")
    p.add_argument("-o", "--output", required=True, help="output parquet (local path or fsspec URL)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel workers (default: all cores)")
    p.add_argument(
        "--executor", choices=("thread", "process"), default="thread", help="kind of worker (default thread)"
    )
    p.set_defaults(func=_phash_command)
