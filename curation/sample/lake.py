"""Synthetic lake partitions at any size: every stage's table and marker written directly, around given embeddings.

For what the sample web is too small to measure (the index and the search service at a million vectors) and for
unit tests that need a consistent lake without running the pipeline: `write_partition` writes pairs, downloads,
clip (with embeddings) and dedupe for one partition, with seeded, plausible values in every column a filter or a
hit reads (languages, sizes, scores, tags). No shard tars are written: image bytes are not part of it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from curation import io
from curation import records as R
from curation.layout import IMG_EMB_FILE, TEXT_EMB_FILE, UIDS_FILE, Lake, Partition, join
from curation.safety import TAG_NSFW, TAG_UNLIKELY, TAG_UNSURE

LANGUAGES = ("en", "de", "fr", "es", "")
LANGUAGE_SHARES = (0.6, 0.1, 0.1, 0.1, 0.1)


def unit_vectors(n: int, dim: int, seed: int, centres: int = 64) -> np.ndarray:
    """float32 unit vectors around `centres` random directions, like CLIP embeddings of a few concepts."""
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(10_007).normal(size=(centres, dim))
    x = c[rng.integers(0, centres, n)] + 0.35 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_partition(lake_root: str, part: Partition, uids: np.ndarray, image_emb: np.ndarray, *,
                    text_emb: np.ndarray | None = None, survivor: np.ndarray | None = None,
                    model: tuple[str, str] = ("synthetic", "sha256:synthetic"), seed: int = 0) -> None:
    """Write one finished partition (tables, embeddings, markers) holding `uids` with `image_emb` (and `text_emb`,
    default the same vectors); `survivor` (default all) marks dedupe survivors. Every row is kept by the filter."""
    n = len(uids)
    uids = np.asarray(uids, dtype=np.int64)
    rng = np.random.default_rng(seed)
    lake = Lake(lake_root)
    urls = [f"https://img{u % 97}.example.com/{part.segment}/{u & 0xFFFFFFFF:08x}.jpg" for u in uids.tolist()]
    _write(lake, "pairs", part, {
        R.UID: uids, R.URL: urls, R.TEXT: [f"synthetic caption {i} of {part.key}" for i in range(n)],
        R.PAGE_URL: [f"https://site{u % 53}.example.com/" for u in uids.tolist()],
        R.LANGUAGE: rng.choice(LANGUAGES, size=n, p=LANGUAGE_SHARES).tolist(),
        R.LANGUAGE_SCORE: rng.uniform(0.7, 1.0, n).astype(np.float32), R.CRAWL: [part.crawl] * n,
        R.SEGMENT: [part.segment] * n, R.WAT_FILE: [f"synthetic/{part.segment}.warc.wat.gz"] * n,
        R.WAT_RECORD: np.arange(n, dtype=np.int64) * 4096, R.WARC_DATE: ["2030-01-01T00:00:00Z"] * n})
    side = rng.choice([256, 512, 1024, 2048], size=(n, 2), p=[0.4, 0.3, 0.2, 0.1]).astype(np.int32)
    _write(lake, "downloads", part, {
        R.UID: uids, R.STATUS: [R.STATUS_SUCCESS] * n, R.ERROR: _nulls(n), R.HTTP_STATUS: np.full(n, 200, np.int32),
        R.FINAL_URL: urls, R.ORIGINAL_WIDTH: side[:, 0], R.ORIGINAL_HEIGHT: side[:, 1],
        R.WIDTH: np.minimum(side[:, 0], 256), R.HEIGHT: np.minimum(side[:, 1], 256),
        R.SHA256: [f"{u & 0xFFFFFFFFFFFF:064x}" for u in uids.tolist()],
        R.SHARD: [f"{i // 10_000:05d}" for i in range(n)],
        R.KEY: [f"{i // 10_000:05d}{i % 10_000:04d}" for i in range(n)],
        R.REASON: _nulls(n)})
    _write_embeddings(lake, part, uids, image_emb, image_emb if text_emb is None else text_emb)
    punsafe = rng.beta(0.3, 6.0, n).astype(np.float32)
    _write(lake, "clip", part, {
        R.UID: uids, R.SIMILARITY: rng.uniform(0.28, 0.45, n).astype(np.float32), R.KEEP: np.ones(n, bool),
        R.REASON: _nulls(n), R.STATUS: [R.STATUS_OK] * n, R.LANGUAGE_THRESHOLD: np.full(n, 0.28, np.float32),
        R.ERROR: _nulls(n), R.PHASH: rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64),
        R.NSFW_TAG: np.where(punsafe > 0.5, TAG_NSFW, np.where(punsafe > 0.3, TAG_UNSURE, TAG_UNLIKELY)).tolist(),
        R.PUNSAFE: punsafe, R.PWATERMARK: rng.beta(0.5, 4.0, n).astype(np.float32),
        R.AESTHETIC: np.clip(rng.normal(5.5, 1.2, n), 0, 10).astype(np.float32),
        R.CLIP_MODEL: [model[0]] * n, R.CLIP_CHECKPOINT: [model[1]] * n,
        **{column: _nulls(n) for column in R.HEAD_COLUMNS.values()}})
    alive = np.ones(n, bool) if survivor is None else np.asarray(survivor, bool)
    _write(lake, "dedupe", part, {
        R.UID: uids, R.PHASH: _nulls(n), R.CLUSTER_ID: uids, R.CLUSTER_SIZE: np.ones(n, np.int32),
        R.SURVIVOR: alive,
        R.REASON: pa.array([None if a else R.DUPLICATE_BYTES for a in alive.tolist()], pa.string()),
        R.CRAWL: [part.crawl] * n,
        R.SEGMENT: [part.segment] * n})


def _nulls(n: int) -> pa.Array:
    return pa.nulls(n, pa.string())


def _write(lake: Lake, stage: str, part: Partition, columns: dict[str, object]) -> None:
    table = pa.table(columns)
    io.write_parquet(table, lake.table(stage, part))
    io.write_marker(lake.partition_dir(stage, part), {"rows": table.num_rows, "synthetic": True})


def _write_embeddings(lake: Lake, part: Partition, uids: np.ndarray, image: np.ndarray, text: np.ndarray) -> None:
    emb_dir = lake.embeddings_dir(part)
    Path(emb_dir).mkdir(parents=True, exist_ok=True)
    for name, array in ((UIDS_FILE, uids), (IMG_EMB_FILE, image.astype(np.float16)),
                        (TEXT_EMB_FILE, text.astype(np.float16))):
        np.save(join(emb_dir, name), array)
