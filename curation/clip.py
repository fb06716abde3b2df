"""The `clip` stage core: one CLIP pass per partition (image + text embeddings, similarity filter, tags).

Data flow of `run_clip_pass`:

- The work list is the `downloads` table's success rows: (shard, key) -> uid.
- `ShardSamples` (a torch `IterableDataset`) reads the webdataset tars with webdataset's tar iterators
  inside DataLoader worker processes, decodes each image with PIL and applies the model's preprocess
  transform there. Workers split the shards between them (whole shards when there are at least as many
  shards as workers, otherwise every worker reads every tar and takes every W-th sample). A sample whose
  image does not decode yields a marker, never an exception.
- Workers batch their own samples (`collate_samples`), so each batch carries the uids of exactly the
  images it holds: alignment never depends on the order batches arrive in. Batches are pinned on CUDA
  and copied with `non_blocking=True` while the workers keep decoding the next ones.
- The main process runs the image tower on each batch and, between image batches, one batch of the text
  tower (once per downloaded pair; captions come from the `pairs` table), so the text tower fills the time
  the workers need to decode. On CUDA, results come back through non-blocking copies into pinned memory
  and the loop only blocks on the loader. Cosine similarity and the language-aware keep decision follow.
- Rows are reordered into `pairs` order before writing, so a rerun writes the same files.

Outputs: `img_emb.npy`, `text_emb.npy` (L2-normalised float16, [n, d]) and `uids.npy` (int64, [n]) in
`out_dir`, row i of each belonging to the same pair; and a `ClipPassResult` whose table has one row per
pair of the partition. Writing the metadata parquet and the success marker is the caller's job.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from curation import records as R
from curation.io import atomic_path, filesystem
from curation.layout import IMG_EMB_FILE, TEXT_EMB_FILE, UIDS_FILE, join
from curation.models import register_model_configs
from curation.phash import IMG_SIZE as THUMB
from curation.phash import hash_thumbnails, thumbnail

PRECISIONS = ("fp32", "fp16", "bf16")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")

CLIP_SCHEMA = pa.schema([
    (R.UID, pa.int64()),
    (R.SIMILARITY, pa.float32()),
    (R.KEEP, pa.bool_()),
    (R.REASON, pa.string()),
    (R.STATUS, pa.string()),
    (R.LANGUAGE_THRESHOLD, pa.float32()),
    (R.ERROR, pa.string()),
    (R.PHASH, pa.int64()),
])


@dataclass(frozen=True)
class ClipPassConfig:
    """Which CLIP model runs where, how the loader feeds it, and the keep thresholds.

    `pretrained` is an open_clip tag (`openai`), a local checkpoint path, `local-dir:<dir>`, or None for a
    random init (offline tests and speed runs). Defaults follow LAION-5B: OpenAI ViT-B/32, keep at
    similarity >= 0.28 for English and >= 0.26 for every other language (empty language included).
    fp16/bf16 mean CUDA autocast; on CPU the pass runs in fp32 and says so (a RuntimeWarning and the
    result's `precision`).
    """

    model_name: str = "ViT-B-32"
    pretrained: str | None = "openai"
    device: str = "auto"
    batch_size: int = 256
    num_workers: int = 4
    precision: str = "fp16"
    threshold_en: float = 0.28
    threshold_other: float = 0.26
    text_batch_size: int = 1024
    prefetch_factor: int = 2  # batches each worker keeps ready

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name must be an open_clip model name, e.g. 'ViT-B-32'")
        if self.pretrained is not None and not self.pretrained.strip():
            raise ValueError("pretrained must be a tag, a path or None, not an empty string")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as exc:
                raise ValueError(f"device must be 'auto' or a torch device string, got {self.device!r}") from exc
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.batch_size < 1 or self.text_batch_size < 1:
            raise ValueError(f"batch_size and text_batch_size must be >= 1, got {self.batch_size}, "
                             f"{self.text_batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0 decodes in the main process), got {self.num_workers}")
        if self.prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be >= 1, got {self.prefetch_factor}")
        for name in ("threshold_en", "threshold_other"):
            value = getattr(self, name)
            if not -1.0 <= value <= 1.0:
                raise ValueError(f"{name} is a cosine similarity threshold in [-1, 1], got {value}")

    def resolve_device(self) -> torch.device:
        """The device this config runs on ('auto' picks CUDA when available)."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_precision(self, device: torch.device) -> str:
        """The precision that will actually run: fp16/bf16 only as CUDA autocast, fp32 elsewhere."""
        return self.precision if device.type == "cuda" else "fp32"

    def threshold_for(self, language: str | None) -> float:
        """The keep threshold of a caption language ('en' vs everything else, empty included)."""
        return self.threshold_en if language == "en" else self.threshold_other


@dataclass
class LoadedClip:
    """A CLIP model ready for inference, with its eval transform, tokenizer, device and precision."""

    model: torch.nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    device: torch.device
    precision: str
    model_name: str
    load_seconds: float = 0.0

    @property
    def embed_dim(self) -> int:
        return int(getattr(getattr(self.model, "visual", None), "output_dim", 0) or 0)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return autocast_context(self.device, self.precision)

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 256) -> np.ndarray:
        """L2-normalised image embeddings of PIL images, [n, d] float32, in input order."""
        return embed_images(self.model, self.preprocess, images, batch_size=batch_size, precision=self.precision)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 1024) -> np.ndarray:
        """L2-normalised text embeddings of captions, [n, d] float32, in input order."""
        return embed_texts(self.model, self.tokenizer, texts, batch_size=batch_size, precision=self.precision)


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """CUDA autocast for fp16/bf16, a no-op for fp32."""
    if device.type == "cuda" and precision in ("fp16", "bf16"):
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


def load_clip(config: ClipPassConfig) -> LoadedClip:
    """Build the open_clip model named by `config` (weights from `pretrained`, or random when None); the
    package's own architecture configs (`curation.models`) are registered first."""
    import open_clip

    register_model_configs()
    started = time.perf_counter()
    device = config.resolve_device()
    precision = config.resolve_precision(device)
    if precision != config.precision and config.device != "auto":  # 'auto' on a CPU-only node is expected
        warnings.warn(f"precision {config.precision} needs CUDA; running in fp32 on {device}",
                      RuntimeWarning, stacklevel=2)
    model, _, preprocess = open_clip.create_model_and_transforms(
        config.model_name, pretrained=config.pretrained, device=device)
    model.eval()
    tokenizer = open_clip.get_tokenizer(config.model_name)
    return LoadedClip(model=model, preprocess=preprocess, tokenizer=tokenizer, device=device,
                      precision=precision, model_name=config.model_name,
                      load_seconds=time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------------
# Embedding helpers


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def encode_image_batch(model: torch.nn.Module, images: torch.Tensor,
                       autocast: contextlib.AbstractContextManager[Any] | None = None) -> torch.Tensor:
    """L2-normalised float32 image embeddings of a preprocessed batch already on the model's device."""
    with torch.inference_mode(), autocast or contextlib.nullcontext():
        feats = model.encode_image(images)  # type: ignore[operator]
    return _normalize(feats)


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def embed_images(model: torch.nn.Module, preprocess: Callable[[Image.Image], torch.Tensor],
                 images: Sequence[Image.Image], *, batch_size: int = 256, precision: str = "fp32") -> np.ndarray:
    """Embed PIL images in memory: [n, d] float32, L2-normalised, in input order."""
    device = _model_device(model)
    out = []
    for i in range(0, len(images), batch_size):
        batch = torch.stack([preprocess(img.convert("RGB")) for img in images[i:i + batch_size]]).to(device)
        out.append(encode_image_batch(model, batch, autocast_context(device, precision)).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def embed_texts(model: torch.nn.Module, tokenizer: Callable[..., torch.Tensor], texts: Sequence[str], *,
                batch_size: int = 1024, precision: str = "fp32") -> np.ndarray:
    """Embed captions with the text tower: [n, d] float32, L2-normalised, in input order."""
    device = _model_device(model)
    out = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[i:i + batch_size])).to(device)
        with torch.inference_mode(), autocast_context(device, precision):
            feats = model.encode_text(tokens)  # type: ignore[operator]
        out.append(_normalize(feats).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


# ---------------------------------------------------------------------------------------------------
# The loader: decode in DataLoader workers, uid carried with every image


class Decoded(NamedTuple):
    """One sample out of a worker: the image tensor, or None and an error when it did not decode."""

    uid: int
    image: torch.Tensor | None
    error: str | None
    thumb: np.ndarray | None = None  # the 32x32 L thumbnail pHash is computed from (curation.phash)


class ImageBatch(NamedTuple):
    """A worker-built batch: `images[i]` is the image of `uids[i]`; failures travel beside it."""

    uids: torch.Tensor  # int64 [b]
    images: torch.Tensor  # [b, 3, H, W]
    failed_uids: torch.Tensor  # int64 [f]
    failed_errors: list[str]
    thumbs: torch.Tensor  # uint8 [b, 32, 32]: pHash thumbnails of the same images


def collate_samples(samples: list[Decoded]) -> ImageBatch:
    """Stack the decoded images of one worker's batch, keeping each uid next to its own image."""
    ok = [s for s in samples if s.image is not None]
    bad = [s for s in samples if s.image is None]
    images = torch.stack([s.image for s in ok if s.image is not None]) if ok else torch.zeros((0,))
    return ImageBatch(
        uids=torch.tensor([s.uid for s in ok], dtype=torch.int64),
        images=images,
        failed_uids=torch.tensor([s.uid for s in bad], dtype=torch.int64),
        failed_errors=[s.error or "" for s in bad],
        thumbs=torch.from_numpy(np.stack([s.thumb for s in ok if s.thumb is not None])) if ok
        else torch.zeros((0, THUMB, THUMB), dtype=torch.uint8),
    )


class ShardMismatchError(RuntimeError):
    """The shards disagree with the downloads table (a stale or foreign shard folder)."""


class ShardSamples(IterableDataset[Decoded]):
    """The expected samples of webdataset tars, decoded and preprocessed in the DataLoader worker.

    `expected` maps shard name -> {key: uid} for the downloads table's success rows. The uid of each
    sample is read from its own `.json` (img2dataset's `uid` column) and checked against the table;
    samples that are not expected are ignored, and a uid that disagrees raises ShardMismatchError.
    """

    def __init__(self, shards_dir: str, expected: Mapping[str, Mapping[str, int]],
                 transform: Callable[[Image.Image], torch.Tensor]) -> None:
        super().__init__()
        self.shards_dir = shards_dir
        self.expected = {shard: dict(keys) for shard, keys in expected.items()}
        self.shards = sorted(self.expected)
        self.transform = transform

    def _assignment(self) -> tuple[list[str], int, int]:
        """(shards this worker reads, sample stride, sample offset)."""
        info = get_worker_info()
        if info is None or info.num_workers == 1:
            return self.shards, 1, 0
        if len(self.shards) >= info.num_workers:
            return self.shards[info.id::info.num_workers], 1, 0
        # Fewer shards than workers: every worker streams every tar and decodes every W-th sample.
        return self.shards, info.num_workers, info.id

    def __iter__(self) -> Iterator[Decoded]:
        from webdataset.tariterators import group_by_keys, tar_file_iterator

        shards, stride, offset = self._assignment()
        fs, root = filesystem(self.shards_dir)
        for shard in shards:
            keys = self.expected[shard]
            path = f"{root.rstrip('/')}/{shard}.tar"
            index = 0
            with fs.open(path, "rb") as f:
                files = ({**item, "__url__": path} for item in tar_file_iterator(f))
                for sample in group_by_keys(files):
                    key = sample["__key__"]
                    if key not in keys:
                        continue
                    mine = index % stride == offset
                    index += 1
                    if mine:
                        yield self._decode(shard, key, keys[key], sample)

    def _decode(self, shard: str, key: str, uid: int, sample: dict[str, Any]) -> Decoded:
        meta = sample.get("json")
        if meta is not None:
            try:
                meta_uid = json.loads(meta).get(R.UID)
            except (ValueError, AttributeError):
                meta_uid = None
            if meta_uid is not None and int(meta_uid) != uid:
                raise ShardMismatchError(
                    f"shard {shard} key {key} holds uid {meta_uid} but the downloads table says {uid}: "
                    f"the shards in {self.shards_dir} are not this downloads table's; rerun the download")
        data = next((sample[ext] for ext in R.IMAGE_EXTENSIONS if ext in sample), None)
        if data is None:
            return Decoded(uid, None, "no image file in sample")
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                thumb = thumbnail(img)  # from the stored image itself, as imagehash.phash(Image.open(...))
                rgb = img.convert("RGB")
            return Decoded(uid, self.transform(rgb), None, thumb)
        except Exception as exc:  # PIL raises many types for bad bytes; each is a per-record failure
            # PIL names the BytesIO object ("<_io.BytesIO object at 0x7f..>"); drop the address so reruns agree.
            return Decoded(uid, None, f"{type(exc).__name__}: {_ADDRESS.sub('', str(exc))}")


# ---------------------------------------------------------------------------------------------------
# The pass


@dataclass(frozen=True)
class ClipPassResult:
    """One row per pair of the partition (see CLIP_SCHEMA), run-level counts and timings."""

    table: pa.Table
    counts_by_status: dict[str, int]
    counts_by_reason: dict[str, int]
    n_embedded: int
    n_kept: int
    embed_dim: int
    device: str
    precision: str
    images_per_s: float  # embedded images per second of the whole pass (model loading excluded)
    seconds_total: float
    # Host-side wall time of each part of the loop. On CUDA the towers run asynchronously, so GPU work
    # shows up wherever the host next waits (usually seconds_decode_wait or the final sync in seconds_text).
    seconds_decode_wait: float  # the main loop waiting for the next batch from the workers
    seconds_model: float  # image tower, transfers and normalisation included
    seconds_text: float  # tokenising and the text tower, plus the final device sync
    seconds_write: float
    files: dict[str, str] = field(default_factory=dict)


def _expected_samples(downloads: pa.Table) -> dict[str, dict[str, int]]:
    expected: dict[str, dict[str, int]] = {}
    rows = downloads.select([R.UID, R.STATUS, R.SHARD, R.KEY]).to_pylist()
    for row in rows:
        if row[R.STATUS] == R.STATUS_SUCCESS:
            if row[R.SHARD] is None or row[R.KEY] is None:
                raise ValueError(f"downloads row for uid {row[R.UID]} is a success without shard/key")
            expected.setdefault(row[R.SHARD], {})[row[R.KEY]] = int(row[R.UID])
    return expected


_MAX_IN_FLIGHT = 32  # device->host copies left pending before one sync; bounds the pinned host memory held


def _land(chunks: list[torch.Tensor], device: torch.device) -> np.ndarray:
    """Wait for pending non-blocking device->host copies and move them into one pageable array (clears)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out = torch.cat(chunks).numpy().copy()
    chunks.clear()
    return out


def _save_npy(array: np.ndarray, path: str) -> None:
    fs, _ = filesystem(path)
    with atomic_path(path) as tmp, fs.open(tmp, "wb") as f:
        np.save(f, array)


def _work_list(shards_dir: str, pairs: pa.Table,
               downloads: pa.Table) -> tuple[dict[int, int], dict[str, dict[str, int]]]:
    """Check the inputs; return (uid -> row in pairs, shard -> {key: uid} of the downloaded samples)."""
    for name, table, cols in (("pairs", pairs, (R.UID, R.TEXT, R.LANGUAGE)),
                              ("downloads", downloads, (R.UID, R.STATUS, R.SHARD, R.KEY))):
        absent = [c for c in cols if c not in table.column_names]
        if absent:
            raise ValueError(f"{name} table lacks columns {absent}")
    pair_uids = [int(u) for u in pairs.column(R.UID).to_pylist()]
    position = {uid: i for i, uid in enumerate(pair_uids)}
    if len(position) != len(pair_uids):
        raise ValueError("pairs has duplicate uids; uids must identify pairs within a partition")
    expected = _expected_samples(downloads)
    unknown = [uid for keys in expected.values() for uid in keys.values() if uid not in position]
    if unknown:
        raise ValueError(f"{len(unknown)} downloaded uids are not in pairs (e.g. {unknown[0]}): "
                         "pairs and downloads are from different partitions")
    fs, root = filesystem(shards_dir)
    missing = [s for s in expected if not fs.exists(f"{root.rstrip('/')}/{s}.tar")]
    if missing:
        raise FileNotFoundError(f"shards {missing[:5]} listed as downloaded are missing from {shards_dir}")
    return position, expected


class _TextBatches:
    """Captions -> text-tower embeddings, one batch per `step()`; on CUDA the copies back do not wait."""

    def __init__(self, clip: LoadedClip, captions: list[str], batch_size: int,
                 autocast: contextlib.AbstractContextManager[Any]) -> None:
        self.clip = clip
        self.captions = captions
        self.batch_size = batch_size
        self.autocast = autocast
        self.starts = iter(range(0, len(captions), batch_size))
        self.chunks: list[torch.Tensor] = []  # pending device->host copies, in caption order

    def step(self) -> bool:
        """Embed the next batch of captions (False when none is left)."""
        i = next(self.starts, None)
        if i is None:
            return False
        tokens = self.clip.tokenizer(self.captions[i:i + self.batch_size]).to(self.clip.device, non_blocking=True)
        with torch.inference_mode(), self.autocast:
            feats = self.clip.model.encode_text(tokens)  # type: ignore[operator]
        self.chunks.append(_normalize(feats).to("cpu", non_blocking=True))
        return True

    def land(self) -> np.ndarray:
        """All caption embeddings embedded so far, [n, d] float32 in caption order."""
        if not self.chunks:
            return np.zeros((0, self.clip.embed_dim), np.float32)
        return _land(self.chunks, self.clip.device)


@dataclass
class _Embedded:
    """What the loader loop produced: image rows in arrival order, caption rows in caption order, timings."""

    img_chunks: list[np.ndarray]
    uid_chunks: list[np.ndarray]  # uid_chunks[i][j] is the uid of img_chunks[i][j]
    thumb_chunks: list[np.ndarray]
    failed: dict[int, str]  # uid -> decode error
    text_emb: np.ndarray
    seconds_decode_wait: float
    seconds_model: float
    seconds_text: float


def _embed_partition(shards_dir: str, expected: Mapping[str, Mapping[str, int]], captions: list[str],
                     clip: LoadedClip, config: ClipPassConfig) -> _Embedded:
    """Shards and captions -> image and text embeddings, text batches interleaved with the image batches."""
    device = clip.device
    autocast = clip.autocast()
    texts = _TextBatches(clip, captions, config.text_batch_size, autocast)
    dataset = ShardSamples(shards_dir, expected, clip.preprocess)
    workers = min(config.num_workers, len(captions))
    loader = DataLoader(dataset, batch_size=config.batch_size, num_workers=workers, collate_fn=collate_samples,
                        pin_memory=device.type == "cuda",
                        prefetch_factor=config.prefetch_factor if workers > 0 else None)
    img_chunks: list[np.ndarray] = []
    in_flight: list[torch.Tensor] = []
    uid_chunks: list[np.ndarray] = []
    thumb_chunks: list[np.ndarray] = []
    failed: dict[int, str] = {}
    wait = model_s = text_s = 0.0
    tick = time.perf_counter()
    for batch in loader:
        got = time.perf_counter()
        wait += got - tick
        failed.update(zip(batch.failed_uids.tolist(), batch.failed_errors, strict=True))
        if batch.uids.numel():
            feats = encode_image_batch(clip.model, batch.images.to(device, non_blocking=True), autocast)
            in_flight.append(feats.to("cpu", non_blocking=True))  # async into pinned memory on CUDA
            uid_chunks.append(batch.uids.numpy())
            thumb_chunks.append(batch.thumbs.numpy())
            if len(in_flight) >= _MAX_IN_FLIGHT:
                img_chunks.append(_land(in_flight, device))
        mid = time.perf_counter()
        model_s += mid - got
        texts.step()  # the text tower runs while the workers decode the next image batches
        tick = time.perf_counter()
        text_s += tick - mid
    while texts.step():
        pass
    if in_flight:
        img_chunks.append(_land(in_flight, device))
    text_emb = texts.land()
    text_s += time.perf_counter() - tick
    return _Embedded(img_chunks, uid_chunks, thumb_chunks, failed, text_emb, wait, model_s, text_s)


class _Aligned(NamedTuple):
    """The embedded pairs' rows in pairs order: uids, both embeddings, and the arrival -> pairs permutation."""

    uids: np.ndarray
    img_emb: np.ndarray
    text_emb: np.ndarray
    order: np.ndarray  # row i of the outputs is arrival row order[i]
    dim: int


def _in_pairs_order(embedded: _Embedded, text_uids: list[int], position: Mapping[int, int], shards_dir: str,
                    embed_dim: int) -> _Aligned:
    """Loop output + the captions' uids -> the embedded rows in pairs order; raises if samples are missing."""
    seen = np.concatenate(embedded.uid_chunks) if embedded.uid_chunks else np.zeros(0, np.int64)
    failed = embedded.failed
    if len(seen) + len(failed) != len(text_uids) or len(set(seen.tolist()) | set(failed)) != len(text_uids):
        raise ShardMismatchError(f"expected {len(text_uids)} samples in {shards_dir}, decoded {len(seen)} and "
                                 f"failed {len(failed)} distinct ones: the shards lack samples the downloads "
                                 "table lists as success (see curation.download.verify_shards)")
    # Pairs order makes reruns write identical files, whatever order the workers finished in.
    order = np.argsort(np.array([position[u] for u in seen.tolist()], dtype=np.int64), kind="stable")
    uids = seen[order]
    img_emb = (np.concatenate(embedded.img_chunks)[order] if embedded.img_chunks
               else np.zeros((0, embed_dim), np.float32))
    dim = img_emb.shape[1] if img_emb.size else embed_dim
    text_row = {u: i for i, u in enumerate(text_uids)}  # decode failures' captions are embedded, then dropped
    text_emb = (embedded.text_emb[[text_row[u] for u in uids.tolist()]] if len(uids)
                else np.zeros((0, dim), np.float32))
    return _Aligned(uids, img_emb, text_emb, order, dim)


def _write_embeddings(out_dir: str, aligned: _Aligned) -> dict[str, str]:
    """Aligned rows -> img_emb.npy, text_emb.npy (float16) and uids.npy (int64) in out_dir; returns their paths."""
    files = {"img_emb": join(out_dir, IMG_EMB_FILE), "text_emb": join(out_dir, TEXT_EMB_FILE),
             "uids": join(out_dir, UIDS_FILE)}
    _save_npy(aligned.img_emb.astype(np.float16), files["img_emb"])
    _save_npy(aligned.text_emb.astype(np.float16), files["text_emb"])
    _save_npy(aligned.uids.astype(np.int64), files["uids"])
    return files


def run_clip_pass(shards_dir: str, pairs: pa.Table, downloads: pa.Table, out_dir: str, config: ClipPassConfig,
                  *, clip: LoadedClip | None = None) -> ClipPassResult:
    """Embed a partition's downloaded images and captions, score them and decide what to keep.

    `pairs` needs uid, text, language; `downloads` is the downloads stage table (its success rows name
    the samples in `<shards_dir>/<shard>.tar`). Writes img_emb.npy, text_emb.npy and uids.npy atomically
    into `out_dir` (see the module docstring) and returns one row per pair. `clip` reuses a loaded model
    (else one is built from `config`). Raises on systemic faults only: missing columns, duplicate uids, a
    missing tar, or shards that disagree with the downloads table.
    """
    position, expected = _work_list(shards_dir, pairs, downloads)
    clip = clip or load_clip(config)
    started = time.perf_counter()

    # Captions of every expected sample, in pairs order. Their text batches are interleaved with the image
    # batches, so the text tower runs while the workers decode (on CUDA nothing here waits for the GPU).
    texts = pairs.column(R.TEXT).to_pylist()
    text_uids = sorted((u for keys in expected.values() for u in keys.values()), key=position.__getitem__)
    captions = [texts[position[u]] or "" for u in text_uids]
    embedded = _embed_partition(shards_dir, expected, captions, clip, config)
    aligned = _in_pairs_order(embedded, text_uids, position, shards_dir, clip.embed_dim)
    uids = aligned.uids
    similarity = np.einsum("nd,nd->n", aligned.img_emb, aligned.text_emb).astype(np.float32)

    write_started = time.perf_counter()
    files = _write_embeddings(out_dir, aligned)
    write_s = time.perf_counter() - write_started

    thumbs = (np.concatenate(embedded.thumb_chunks) if embedded.thumb_chunks
              else np.zeros((0, THUMB, THUMB), np.uint8))
    phashes = hash_thumbnails(thumbs)[aligned.order] if len(uids) else np.zeros(0, np.uint64)
    table = _result_table(pairs, config, downloads, uids, similarity, embedded.failed, phashes)
    total = time.perf_counter() - started
    statuses = Counter(table.column(R.STATUS).to_pylist())
    reasons = Counter(r for r in table.column(R.REASON).to_pylist() if r is not None)
    return ClipPassResult(
        table=table,
        counts_by_status=dict(statuses),
        counts_by_reason=dict(reasons.most_common()),
        n_embedded=len(uids),
        n_kept=int(sum(table.column(R.KEEP).to_pylist())),
        embed_dim=aligned.dim,
        device=str(clip.device),
        precision=clip.precision,
        images_per_s=len(uids) / total if total > 0 else 0.0,
        seconds_total=total,
        seconds_decode_wait=embedded.seconds_decode_wait,
        seconds_model=embedded.seconds_model,
        seconds_text=embedded.seconds_text,
        seconds_write=write_s,
        files=files,
    )


def _result_table(pairs: pa.Table, config: ClipPassConfig, downloads: pa.Table, uids: np.ndarray,
                  similarity: np.ndarray, failed: Mapping[int, str], phashes: np.ndarray) -> pa.Table:
    """One row per pair, in pairs order: ok rows scored, decode failures and non-downloads marked."""
    score = dict(zip(uids.tolist(), similarity.tolist(), strict=True))
    # pHash bits stored as int64 (parquet has no uint64 that every reader handles); phash.to_hex reads them.
    phash_of = dict(zip(uids.tolist(), phashes.view(np.int64).tolist(), strict=True))
    download_status = dict(zip(downloads.column(R.UID).to_pylist(), downloads.column(R.STATUS).to_pylist(),
                              strict=True))
    download_reason = (dict(zip(downloads.column(R.UID).to_pylist(), downloads.column(R.REASON).to_pylist(),
                               strict=True)) if R.REASON in downloads.column_names else {})
    out: dict[str, list[Any]] = {name: [] for name in CLIP_SCHEMA.names}
    for uid, language in zip(pairs.column(R.UID).to_pylist(), pairs.column(R.LANGUAGE).to_pylist(), strict=True):
        threshold = config.threshold_for(language)
        sim: float | None = None
        error: str | None = None
        if uid in score:
            sim = score[uid]
            status = R.STATUS_OK
            keep = bool(np.float32(sim) >= np.float32(threshold))
            reason = None if keep else R.DROP_LOW_SIMILARITY
        elif uid in failed:
            status = reason = R.STATUS_FAILED_DECODE
            keep, error = False, failed[uid]
        elif download_status.get(uid) == R.STATUS_TAKEN_DOWN:  # emptied by a takedown (curation.takedowns)
            status, reason, keep = R.STATUS_TAKEN_DOWN, download_reason.get(uid), False
        else:
            status = reason = R.STATUS_NOT_DOWNLOADED
            keep, error = False, download_status.get(uid)
        out[R.UID].append(uid)
        out[R.SIMILARITY].append(sim)
        out[R.KEEP].append(keep)
        out[R.REASON].append(reason)
        out[R.STATUS].append(status)
        out[R.LANGUAGE_THRESHOLD].append(threshold)
        out[R.ERROR].append(error)
        out[R.PHASH].append(phash_of.get(uid))
    return pa.Table.from_pydict(out, schema=CLIP_SCHEMA)
