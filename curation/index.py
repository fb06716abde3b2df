"""The ANN index over kept, deduplicated CLIP embeddings: chosen from size and memory, built in batches, grown in place.

The index type follows autofaiss's reasoning, scaled to what the lake holds:

- up to `flat_max_vectors` vectors: exact search (`IDMap2,Flat`), recall 1 by construction;
- otherwise, when the raw vectors fit the memory budget: `IVF{nlist},Flat` (an HNSW coarse quantizer above
  4,096 lists), with `nprobe` tuned on held-in queries until recall@k against exact search reaches the target;
- otherwise: `OPQ{m}_{y},IVF{nlist}[_HNSW32],PQ{m}x8` with the largest code size `m` that fits the budget.

HNSW as the main index (autofaiss's first choice when memory allows) is not used: it cannot remove vectors,
and this index must drop uids that stop surviving dedupe when a later crawl brings a better copy.

Vectors are identified by their `uid` (faiss ids), so a search answers uids directly. State lives in
`<lake>/index/<modality>/`: the serialized index and its id table per generation, and `manifest.json`, the
commit point, written last. An update reads only partitions whose survivors or embeddings changed: it
removes their old vectors and adds the new ones, and rebuilds (retrains) when the chosen index type no longer
fits the vector count, the budget or the model changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import io
from curation import records as R
from curation.layout import EMBEDDING_FILES, UIDS_FILE, Lake, Partition, join
from curation.metastore import write_metastore

MODALITIES = ("image", "text")
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 2  # 2: each generation carries its metadata store (curation.metastore)
# Above this many inverted lists a flat coarse quantizer costs more than the lists it routes to.
HNSW_QUANTIZER_MIN_LISTS = 4096
# PQ code sizes tried, largest (most accurate) first; autofaiss's list.
PQ_SIZES = (256, 128, 64, 48, 32, 24, 16, 8, 4)
ID_BYTES = 8  # every stored vector carries its int64 id
_GENERATION_FILE = re.compile(r"(index-\d{6}\.faiss|ids-\d{6}\.parquet|meta-\d{6}\.arrow|aesthetic-\d{6}\.npy)")
IDS_SCHEMA = pa.schema([(R.UID, pa.int64()), (R.CRAWL, pa.string()), (R.SEGMENT, pa.string())])


@dataclass(frozen=True)
class IndexConfig:
    """How the index is chosen, built and tuned. Frozen and validated; changing a field that shapes the index
    (modality, budget, thresholds, seed) rebuilds it on the next update."""

    modality: str = "image"
    memory_budget_bytes: int = 4 << 30
    flat_max_vectors: int = 20_000
    target_recall: float = 0.96  # on sampled indexed vectors; held-out queries land ~0.01 lower
    k: int = 10
    max_query_ms: float = 10.0
    eval_queries: int = 500
    batch_size: int = 65_536
    train_points_per_list: int = 64  # faiss warns below 39
    kmeans_iterations: int = 10
    seed: int = 0
    use_gpu: bool = False  # train IVF centroids on the GPU when faiss has one

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        if self.memory_budget_bytes < 1 << 20:
            raise ValueError(f"memory_budget_bytes must be at least 1 MiB, got {self.memory_budget_bytes}")
        if self.flat_max_vectors < 1:
            raise ValueError(f"flat_max_vectors must be >= 1, got {self.flat_max_vectors}")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")
        if self.k < 1 or self.eval_queries < 1 or self.batch_size < 1:
            raise ValueError("k, eval_queries and batch_size must be >= 1")
        if self.max_query_ms <= 0:
            raise ValueError(f"max_query_ms must be > 0, got {self.max_query_ms}")
        if self.train_points_per_list < 39:
            raise ValueError(f"train_points_per_list must be >= 39 (faiss's minimum), got {self.train_points_per_list}")
        if self.kmeans_iterations < 1:
            raise ValueError(f"kmeans_iterations must be >= 1, got {self.kmeans_iterations}")

    def shape(self) -> dict[str, Any]:
        """The fields that decide what index is built (a change rebuilds it)."""
        out = asdict(self)
        for transient in ("eval_queries", "batch_size", "use_gpu", "max_query_ms", "target_recall", "k"):
            out.pop(transient)
        return out


@dataclass(frozen=True)
class IndexPlan:
    """The index type chosen for a vector count and dimension (see `choose_index`)."""

    factory: str
    family: str  # flat | ivf_flat | ivf_pq
    nlist: int
    pq_m: int
    estimated_bytes: int
    reason: str


def ivf_lists(n: int) -> int:
    """Inverted lists for n vectors: 2 sqrt(n) rounded to a power of two, in [16, 65536].

    Below faiss's 4-16 sqrt(n) guideline on purpose: assignment and k-means cost grow with the list count, and
    nprobe is tuned afterwards to the recall target. Measured at 1M x 512 (benchmarks/bench_index.py): sqrt(n)
    lists put single-query p99 at ~9.6 ms for recall 0.96; 2 sqrt(n) halves the vectors each query scans."""
    return int(min(65536, max(16, 2 ** round(math.log2(max(1.0, 2 * math.sqrt(n)))))))


def choose_index(n: int, dim: int, config: IndexConfig) -> IndexPlan:
    """Pick the index type for `n` vectors of dimension `dim` under `config` (pure; see the module doc)."""
    if n < 0 or dim < 1:
        raise ValueError(f"need n >= 0 and dim >= 1, got n={n}, dim={dim}")
    flat_bytes = n * (4 * dim + ID_BYTES)
    if n <= config.flat_max_vectors:
        if flat_bytes > config.memory_budget_bytes:
            raise ValueError(f"{n} vectors of dim {dim} need {flat_bytes:,} bytes even for an exact index, over the "
                             f"memory budget of {config.memory_budget_bytes:,}: raise the budget")
        return IndexPlan("IDMap2,Flat", "flat", 0, 0, flat_bytes,
                         f"{n} <= {config.flat_max_vectors} vectors: exact search")
    # Never more lists than the training points support; a power of two, so the type holds while n doubles.
    nlist = min(ivf_lists(n), 2 ** int(math.log2(max(1, n // config.train_points_per_list))))
    coarse = f"IVF{nlist}_HNSW32" if nlist > HNSW_QUANTIZER_MIN_LISTS else f"IVF{nlist}"
    ivf_bytes = flat_bytes + nlist * 4 * dim
    if ivf_bytes <= config.memory_budget_bytes:
        return IndexPlan(f"{coarse},Flat", "ivf_flat", nlist, 0, ivf_bytes,
                         f"{n} vectors fit the budget unquantized ({ivf_bytes:,} <= {config.memory_budget_bytes:,} "
                         f"bytes): inverted lists, nprobe tuned for recall")
    for m in PQ_SIZES:
        if m >= dim:
            continue
        pq_bytes = n * (m + ID_BYTES) + nlist * 4 * dim + 4 * dim * dim
        if pq_bytes <= config.memory_budget_bytes:
            y = (min(dim // m, 6) + 1) * m  # OPQ output: a multiple of m slightly above dim (autofaiss's rule)
            return IndexPlan(f"OPQ{m}_{y},{coarse},PQ{m}x8", "ivf_pq", nlist, m, pq_bytes,
                             f"raw vectors need {ivf_bytes:,} bytes, over the budget: PQ{m} codes")
    raise ValueError(f"{n} vectors of dim {dim} do not fit {config.memory_budget_bytes:,} bytes even as PQ4 codes: "
                     f"raise the memory budget")


# ------------------------------------------------------------------------------------------------ the lake side


@dataclass(frozen=True)
class PartitionVectors:
    """One partition's indexable vectors: the survivors of dedupe among its kept pairs."""

    partition: Partition
    uids: np.ndarray  # sorted int64
    digest: str  # changes when the survivors or the embeddings behind them change
    clip_model: str
    clip_checkpoint: str


def index_dir(lake_root: str, modality: str) -> str:
    return join(Lake(lake_root).index_dir(), modality)


def indexable_partitions(lake_root: str) -> list[PartitionVectors]:
    """Every partition with finished clip and dedupe tables, with its surviving uids (sorted)."""
    lake = Lake(lake_root)
    out = []
    for part in io.finished_partitions(lake.stage_dir("dedupe")):
        clip_marker = io.read_marker(lake.partition_dir("clip", part))
        if clip_marker is None:
            continue
        dedupe = _read(lake.table("dedupe", part), (R.UID, R.SURVIVOR))
        uids = np.sort(dedupe.filter(pc.fill_null(dedupe.column(R.SURVIVOR), False)).column(R.UID).to_numpy())
        clip = _read(lake.table("clip", part), ("clip_model", "clip_checkpoint"))
        models = {(m, c) for m, c in zip(clip.column("clip_model").to_pylist(),
                                         clip.column("clip_checkpoint").to_pylist(), strict=True)
                  if m is not None}
        if len(models) > 1:
            raise ValueError(f"{part.key}: clip rows scored by several models {sorted(models)}; re-score it")
        model, checkpoint = models.pop() if models else ("", "")
        h = hashlib.sha256(uids.astype("<i8").tobytes())
        h.update(json.dumps(clip_marker, sort_keys=True, default=str).encode())
        out.append(PartitionVectors(part, uids.astype(np.int64), h.hexdigest()[:32], str(model), str(checkpoint)))
    return out


def _read(path: str, columns: Sequence[str]) -> pa.Table:
    fs, p = io.filesystem(path)
    return pq.read_table(p, columns=list(columns), filesystem=fs)


def partition_vectors(lake_root: str, pv: PartitionVectors, modality: str, batch_size: int
                      ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uids, float32 vectors) of a partition's survivors, in batches, read from its memory-mapped npy."""
    lake = Lake(lake_root)
    emb_dir = lake.embeddings_dir(pv.partition)
    order = io.read_npy(join(emb_dir, UIDS_FILE)).astype(np.int64)
    emb = io.open_npy(join(emb_dir, EMBEDDING_FILES[modality]))
    if emb.shape[0] != order.shape[0]:
        raise ValueError(f"{pv.partition.key}: {emb.shape[0]} embeddings for {order.shape[0]} uids; re-run clip")
    sorter = np.argsort(order, kind="stable")
    where = np.searchsorted(order, pv.uids, sorter=sorter)
    found = (where < len(order)) & (order[sorter[np.minimum(where, len(order) - 1)]] == pv.uids)
    if not found.all():
        raise ValueError(f"{pv.partition.key}: {int((~found).sum())} surviving uids have no embedding; re-run clip")
    rows = np.sort(sorter[where])  # read the npy front to back
    for i in range(0, len(rows), batch_size):
        sel = rows[i:i + batch_size]
        yield order[sel], np.ascontiguousarray(emb[sel], dtype=np.float32)


# ------------------------------------------------------------------------------------------------- building


@dataclass
class IndexResult:
    """What an update did and how good the index is."""

    factory: str
    family: str
    vectors: int
    dim: int
    nlist: int
    nprobe: int
    recall_at_k: float
    k: int
    query_ms_p50: float
    query_ms_p99: float
    added: int  # uids now indexed that were not before
    removed: int  # uids indexed before that are not now
    rewritten: int  # vectors written by this update (new and changed partitions, or everything on a rebuild)
    rebuilt: bool
    rebuild_reason: str
    partitions: int
    partitions_changed: list[str]
    index_bytes: int
    build_seconds: float
    clip_model: str
    clip_checkpoint: str
    generation: int
    recall_by_nprobe: dict[str, float] = field(default_factory=dict)
    unchanged: bool = False


@dataclass(frozen=True)
class Manifest:
    generation: int
    factory: str
    family: str
    dim: int
    nlist: int
    nprobe: int
    config_shape: dict[str, Any]
    clip_model: str
    clip_checkpoint: str
    partitions: dict[str, str]  # partition key -> PartitionVectors.digest
    vectors: int
    trained_on: int
    recall_at_k: float
    k: int
    query_ms_p50: float
    query_ms_p99: float
    recall_by_nprobe: dict[str, float]
    index_file: str
    ids_file: str
    index_bytes: int
    meta_file: str  # the uid-keyed metadata store (curation.metastore), written with the generation
    aesthetic_file: str  # mean embedding per aesthetic rating (clip-retrieval's query shift)
    format_version: int = FORMAT_VERSION

    def generation_files(self) -> tuple[str, ...]:
        return (self.index_file, self.ids_file, self.meta_file, self.aesthetic_file)

    @staticmethod
    def load(lake_root: str, modality: str) -> Manifest | None:
        path = join(index_dir(lake_root, modality), MANIFEST_FILE)
        if not io.exists(path):
            return None
        data = io.read_json(path)
        if data.get("format_version") != FORMAT_VERSION:
            return None
        return Manifest(**data)


@dataclass(frozen=True)
class _Target:
    """What the index must hold now (see `_target`)."""

    parts: list[PartitionVectors]
    clip_model: str
    clip_checkpoint: str
    dim: int
    total: int  # surviving vectors over all parts
    plan: IndexPlan


def build_index(lake_root: str, config: IndexConfig, *, force_rebuild: bool = False) -> IndexResult:
    """Bring `<lake>/index/<modality>` up to date with the survivors of every finished dedupe partition.

    New and changed partitions are added (their old vectors removed first), vanished ones removed; the whole
    index is rebuilt and retrained when there is none yet, the chosen type no longer fits the vector count,
    the model or the config changed, or `force_rebuild`. Then nprobe is tuned and recall@k measured against
    exact search. Raises ValueError when partitions were scored by different models (their embeddings are
    not comparable) or when nothing is indexable yet.
    """
    started = time.perf_counter()
    target = _target(lake_root, config)
    old = Manifest.load(lake_root, config.modality)
    reason = _rebuild_reason(old, target.plan, config, target.clip_model, target.clip_checkpoint, target.dim,
                             force_rebuild)
    wanted = {p.partition.key: p for p in target.parts}
    if old is not None and not reason and old.partitions == {k: p.digest for k, p in wanted.items()}:
        _drop_other_generations(index_dir(lake_root, config.modality), old)
        return _result(old, len(target.parts), time.perf_counter() - started, unchanged=True)

    before = _read_ids(lake_root, config.modality, old).column(R.UID).to_numpy() if old else np.zeros(0, np.int64)
    if reason:
        index, ids = _train(lake_root, target.parts, target.plan, target.dim, config), _empty_ids()
        changed = sorted(wanted)
        trained_on = target.total
    else:
        assert old is not None
        index, ids, changed = _load_for_update(lake_root, config.modality, old, wanted)
        trained_on = old.trained_on
    ids, rewritten = _add_partitions(lake_root, config, index, ids, [wanted[k] for k in changed])
    after = ids.column(R.UID).to_numpy()
    added, removed = int(np.setdiff1d(after, before).size), int(np.setdiff1d(before, after).size)

    tuning = tune_nprobe(index, target.plan, lake_root, target.parts, config)
    manifest = _commit(lake_root, config, target, index, ids, tuning,
                       generation=(old.generation + 1) if old is not None else 1, trained_on=trained_on,
                       partitions={k: p.digest for k, p in sorted(wanted.items())})
    _drop_other_generations(index_dir(lake_root, config.modality), manifest)
    return _result(manifest, len(target.parts), time.perf_counter() - started, added=added, removed=removed,
                   rewritten=rewritten, reason=reason, changed=changed)


def _target(lake_root: str, config: IndexConfig) -> _Target:
    """The indexable partitions of the lake, their CLIP model, dimension and vector count, and the index type for
    them. Raises ValueError when nothing is indexable or partitions were scored by different models."""
    parts = indexable_partitions(lake_root)
    if not parts:
        raise ValueError(f"nothing to index under {lake_root}: materialize clip and dedupe first")
    models = {(p.clip_model, p.clip_checkpoint) for p in parts if p.uids.size}
    if len(models) > 1:
        raise ValueError(f"partitions were scored by different models {sorted(models)}: their embeddings are not "
                         f"comparable; re-score the odd ones out before indexing")
    clip_model, clip_checkpoint = models.pop() if models else (parts[0].clip_model, parts[0].clip_checkpoint)
    dim = _dimension(lake_root, parts, config.modality)
    total = int(sum(p.uids.size for p in parts))
    if total == 0:
        raise ValueError("no dedupe survivors to index yet")
    return _Target(parts, clip_model, clip_checkpoint, dim, total, choose_index(total, dim, config))


def _load_for_update(lake_root: str, modality: str, old: Manifest, wanted: dict[str, PartitionVectors]
                     ) -> tuple[faiss.Index, pa.Table, list[str]]:
    """The committed index and id table without the vectors of changed or vanished partitions, and the sorted keys
    of the partitions in `wanted` to add (new or changed). RuntimeError when faiss removes fewer than asked."""
    index = _load_index(lake_root, modality, old)
    ids = _read_ids(lake_root, modality, old)
    changed = sorted(k for k, p in wanted.items() if old.partitions.get(k) != p.digest)
    gone = sorted(set(old.partitions) - set(wanted))
    drop_keys = set(changed) | set(gone)
    keys = pc.binary_join_element_wise(ids.column(R.CRAWL), ids.column(R.SEGMENT), "|")
    drop = pc.is_in(keys, value_set=pa.array(sorted(drop_keys), pa.string()))
    drop_uids = ids.filter(drop).column(R.UID).to_numpy()
    dropped = int(index.remove_ids(faiss.IDSelectorBatch(drop_uids))) if drop_uids.size else 0
    if dropped != drop_uids.size:
        raise RuntimeError(f"index removed {dropped} of {drop_uids.size} vectors; rebuild it (force_rebuild)")
    return index, ids.filter(pc.invert(drop)), changed


def _add_partitions(lake_root: str, config: IndexConfig, index: faiss.Index, ids: pa.Table,
                    parts: Sequence[PartitionVectors]) -> tuple[pa.Table, int]:
    """Add the vectors of `parts` to `index` (in place), in batches; (id table with their rows appended, vectors
    added). RuntimeError when the index and the id table disagree afterwards."""
    added_tables = [ids]
    rewritten = 0
    for pv in parts:
        for uids, vecs in partition_vectors(lake_root, pv, config.modality, config.batch_size):
            index.add_with_ids(vecs, uids)
            rewritten += len(uids)
        added_tables.append(pa.table({R.UID: pa.array(pv.uids, pa.int64()),
                                      R.CRAWL: [pv.partition.crawl] * pv.uids.size,
                                      R.SEGMENT: [pv.partition.segment] * pv.uids.size}, schema=IDS_SCHEMA))
    out = pa.concat_tables(added_tables)
    if index.ntotal != out.num_rows:
        raise RuntimeError(f"index holds {index.ntotal} vectors but the id table {out.num_rows}")
    return out, rewritten


def _commit(lake_root: str, config: IndexConfig, target: _Target, index: faiss.Index, ids: pa.Table, tuning: Tuning,
            *, generation: int, trained_on: int, partitions: dict[str, str]) -> Manifest:
    """Write generation `generation`'s index, id table and metadata store, then manifest.json naming them (the commit
    point);
    return that manifest. Other generations' files are left for `_drop_other_generations`."""
    out_dir = index_dir(lake_root, config.modality)
    index_file, ids_file = f"index-{generation:06d}.faiss", f"ids-{generation:06d}.parquet"
    meta_file, aesthetic_file = f"meta-{generation:06d}.arrow", f"aesthetic-{generation:06d}.npy"
    index_bytes = _write_index(index, join(out_dir, index_file))
    io.write_parquet(ids, join(out_dir, ids_file))
    write_metastore(lake_root, ids, config.modality, join(out_dir, meta_file), join(out_dir, aesthetic_file))
    plan = target.plan
    manifest = Manifest(
        generation=generation, factory=plan.factory, family=plan.family, dim=target.dim, nlist=plan.nlist,
        nprobe=tuning.nprobe, config_shape=config.shape(), clip_model=target.clip_model,
        clip_checkpoint=target.clip_checkpoint, partitions=partitions, vectors=int(index.ntotal),
        trained_on=trained_on, recall_at_k=tuning.recall, k=config.k, query_ms_p50=tuning.p50_ms,
        query_ms_p99=tuning.p99_ms, recall_by_nprobe=tuning.recall_by_nprobe, index_file=index_file,
        ids_file=ids_file, index_bytes=index_bytes, meta_file=meta_file, aesthetic_file=aesthetic_file)
    io.write_json(asdict(manifest), join(out_dir, MANIFEST_FILE))  # the commit point
    return manifest


def _drop_other_generations(out_dir: str, manifest: Manifest) -> None:
    """Remove every generation's index and id files but the committed one's: the previous generation once the
    manifest names the new one, and whatever a killed update left (files of a generation never committed, or of
    the one before when it died between the commit and this cleanup)."""
    fs, root = io.filesystem(out_dir)
    for path in fs.ls(root, detail=False):
        name = str(path).rstrip("/").rsplit("/", 1)[-1]
        if _GENERATION_FILE.fullmatch(name) and name not in manifest.generation_files():
            fs.rm(path)


def _result(manifest: Manifest, partitions: int, seconds: float, *, added: int = 0, removed: int = 0,
            rewritten: int = 0, reason: str = "", changed: list[str] | None = None,
            unchanged: bool = False) -> IndexResult:
    """The IndexResult of an update that left `manifest` committed, from it and what the update changed."""
    return IndexResult(
        factory=manifest.factory, family=manifest.family, vectors=manifest.vectors, dim=manifest.dim,
        nlist=manifest.nlist, nprobe=manifest.nprobe, recall_at_k=manifest.recall_at_k, k=manifest.k,
        query_ms_p50=manifest.query_ms_p50, query_ms_p99=manifest.query_ms_p99, added=added, removed=removed,
        rewritten=rewritten, rebuilt=bool(reason), rebuild_reason=reason, partitions=partitions,
        partitions_changed=changed if changed is not None else [], index_bytes=manifest.index_bytes,
        build_seconds=seconds, clip_model=manifest.clip_model, clip_checkpoint=manifest.clip_checkpoint,
        generation=manifest.generation, recall_by_nprobe=manifest.recall_by_nprobe, unchanged=unchanged)


def _rebuild_reason(old: Manifest | None, plan: IndexPlan, config: IndexConfig, clip_model: str,
                    clip_checkpoint: str, dim: int, force: bool) -> str:
    if force:
        return "rebuild requested"
    if old is None:
        return "no index yet"
    if (old.clip_model, old.clip_checkpoint) != (clip_model, clip_checkpoint) or old.dim != dim:
        return f"model changed ({old.clip_model} {old.clip_checkpoint} -> {clip_model} {clip_checkpoint})"
    if old.config_shape != config.shape():
        return "index config changed"
    if old.factory != plan.factory:
        return f"{old.factory} no longer fits the vector count: {plan.factory} ({plan.reason})"
    return ""


def _dimension(lake_root: str, parts: Sequence[PartitionVectors], modality: str) -> int:
    lake = Lake(lake_root)
    dims = set()
    for p in parts:
        emb = io.open_npy(join(lake.embeddings_dir(p.partition), EMBEDDING_FILES[modality]))
        if emb.ndim != 2:
            raise ValueError(f"{p.partition.key}: {modality} embeddings are not a 2-d array")
        dims.add(int(emb.shape[1]))
    if len(dims) != 1:
        raise ValueError(f"partitions disagree on the embedding dimension: {sorted(dims)}")
    return dims.pop()


def _sample(lake_root: str, parts: Sequence[PartitionVectors], want: int, config: IndexConfig) -> np.ndarray:
    """Up to `want` vectors drawn uniformly from all survivors (seeded), read partition by partition."""
    total = sum(p.uids.size for p in parts)
    rng = np.random.default_rng(config.seed)
    chosen = np.sort(rng.choice(total, size=min(want, total), replace=False))
    out, offset = [], 0
    for p in parts:
        local = chosen[(chosen >= offset) & (chosen < offset + p.uids.size)] - offset
        offset += p.uids.size
        if local.size == 0:
            continue
        sub = PartitionVectors(p.partition, p.uids[local], p.digest, p.clip_model, p.clip_checkpoint)
        out += [v for _, v in partition_vectors(lake_root, sub, config.modality, config.batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _train(lake_root: str, parts: Sequence[PartitionVectors], plan: IndexPlan, dim: int,
           config: IndexConfig) -> faiss.Index:
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.family == "flat":
        return index
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = config.kmeans_iterations
    ivf.cp.seed = config.seed
    ivf.cp.max_points_per_centroid = config.train_points_per_list
    want = plan.nlist * config.train_points_per_list
    if plan.family == "ivf_pq":
        want = max(want, 256 * 64)  # PQ codebooks need their own ~64 points per code
    train = _sample(lake_root, parts, want, config)
    if config.use_gpu and faiss.get_num_gpus() > 0 and plan.family == "ivf_flat":
        km = faiss.Kmeans(dim, plan.nlist, niter=config.kmeans_iterations, seed=config.seed, gpu=True,
                          spherical=False, max_points_per_centroid=config.train_points_per_list)
        km.train(train)
        assert km.centroids is not None
        ivf.quantizer.add(km.centroids)
        ivf.is_trained = True
    else:
        index.train(train)
    return index


def _empty_ids() -> pa.Table:
    return IDS_SCHEMA.empty_table()


def _write_index(index: faiss.Index, path: str) -> int:
    """Write atomically; straight from faiss to a local file (no in-memory copy of a multi-GB index)."""
    if io.is_local(path):
        with io.atomic_path(path) as tmp:
            faiss.write_index(index, tmp)
            return int(Path(tmp).stat().st_size)
    data = faiss.serialize_index(index)
    io.write_bytes(data.tobytes(), path)
    return int(data.size)


def _load_index(lake_root: str, modality: str, manifest: Manifest) -> faiss.Index:
    path = join(index_dir(lake_root, modality), manifest.index_file)
    if io.is_local(path):
        return faiss.read_index(io.filesystem(path)[1])
    fs, p = io.filesystem(path)
    with fs.open(p, "rb") as f:
        return faiss.deserialize_index(np.frombuffer(f.read(), dtype=np.uint8))


def _read_ids(lake_root: str, modality: str, manifest: Manifest) -> pa.Table:
    return _read(join(index_dir(lake_root, modality), manifest.ids_file), IDS_SCHEMA.names).cast(IDS_SCHEMA)


# ------------------------------------------------------------------------------------------- tuning, search


@dataclass(frozen=True)
class Tuning:
    nprobe: int
    recall: float
    p50_ms: float
    p99_ms: float
    recall_by_nprobe: dict[str, float]


def exact_top_k(queries: np.ndarray, batches: Iterator[tuple[np.ndarray, np.ndarray]], k: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k ids of `queries` over streamed (ids, vectors) batches: (scores, ids)."""
    best_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for ids, vecs in batches:
        scores = queries @ vecs.T
        s = np.concatenate([best_s, scores], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(ids, scores.shape)], axis=1)
        top = np.argpartition(-s, min(k, s.shape[1] - 1), axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true top-k ids present in its returned ids (-1 never counts)."""
    hits = [len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) / max(1, int((t >= 0).sum()))
            for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits)) if hits else 1.0


def query_latency_ms(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[float, float]:
    """p50 and p99 latency of single-query searches (one query per call, as a service sees them)."""
    times = []
    for q in queries[: min(len(queries), 200)]:
        t = time.perf_counter()
        index.search(q[None, :], k)
        times.append((time.perf_counter() - t) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set nprobe (and the HNSW quantizer's efSearch) on an IVF index, through any pre-transform."""
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = nprobe
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(2 * nprobe, 16)


def tune_nprobe(index: faiss.Index, plan: IndexPlan, lake_root: str, parts: Sequence[PartitionVectors],
                config: IndexConfig) -> Tuning:
    """The smallest nprobe (powers of two) whose recall@k against exact search reaches the target within the
    query-time budget (median single-query latency); else the best recall within it. Queries are a seeded
    sample of the vectors."""
    queries = _sample(lake_root, parts, config.eval_queries, IndexConfig(
        modality=config.modality, seed=config.seed + 1, batch_size=config.batch_size))
    k = min(config.k, int(index.ntotal))
    _, truth = exact_top_k(queries, (b for p in parts for b in partition_vectors(
        lake_root, p, config.modality, config.batch_size)), k)
    if plan.family == "flat":
        _, found = index.search(queries, k)
        p50, p99 = query_latency_ms(index, queries, k)
        r = recall_at_k(found, truth)
        return Tuning(0, r, p50, p99, {"exact": r})
    by_nprobe: dict[str, float] = {}
    best: Tuning | None = None
    nprobe = 1
    while nprobe <= plan.nlist:
        set_nprobe(index, nprobe)
        _, found = index.search(queries, k)
        r = recall_at_k(found, truth)
        p50, p99 = query_latency_ms(index, queries, k)
        by_nprobe[str(nprobe)] = round(r, 4)
        if p50 > config.max_query_ms and best is not None:  # the median: p99 on a busy machine is noise
            break
        best = Tuning(nprobe, r, p50, p99, by_nprobe)
        if r >= config.target_recall:
            break
        nprobe *= 2
    assert best is not None
    set_nprobe(index, best.nprobe)
    return Tuning(best.nprobe, best.recall, best.p50_ms, best.p99_ms, dict(by_nprobe))


@dataclass(frozen=True)
class LoadedIndex:
    """A committed index ready for queries: the faiss index (nprobe set) and its manifest."""

    index: faiss.Index
    manifest: Manifest

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, uids) of the top-k per query; uid -1 pads when the index holds fewer than k vectors."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.manifest.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index {self.manifest.dim} "
                             f"({self.manifest.clip_model}): encode them with the model that built it")
        return self.index.search(q, k)


def load_index(lake_root: str, modality: str = "image") -> LoadedIndex:
    """The committed index of a lake (raises FileNotFoundError with the fix when none is built)."""
    manifest = Manifest.load(lake_root, modality)
    if manifest is None:
        raise FileNotFoundError(f"no {modality} index under {index_dir(lake_root, modality)}: run "
                                f"`curation index build {lake_root}` or materialize the index asset")
    index = _load_index(lake_root, modality, manifest)
    if manifest.family != "flat":
        set_nprobe(index, manifest.nprobe)
    return LoadedIndex(index, manifest)


def index_ids(lake_root: str, modality: str = "image") -> pa.Table:
    """The (uid, crawl, segment) of every vector in the committed index."""
    manifest = Manifest.load(lake_root, modality)
    if manifest is None:
        return _empty_ids()
    return _read_ids(lake_root, modality, manifest)


def verify_index(lake_root: str, modality: str = "image") -> list[str]:
    """Problems with the committed index (empty when sound): its size and ids equal the dedupe survivors of the
    partitions it covers, and the id table agrees with the index."""
    problems = []
    manifest = Manifest.load(lake_root, modality)
    if manifest is None:
        return [f"no committed {modality} index"]
    index = _load_index(lake_root, modality, manifest)
    ids = _read_ids(lake_root, modality, manifest)
    if index.ntotal != ids.num_rows or index.ntotal != manifest.vectors:
        problems.append(f"index holds {index.ntotal} vectors, id table {ids.num_rows}, manifest {manifest.vectors}")
    survivors = {p.partition.key: p for p in indexable_partitions(lake_root)}
    stale = sorted(k for k, d in manifest.partitions.items() if k not in survivors or survivors[k].digest != d)
    missing = sorted(set(survivors) - set(manifest.partitions))
    if stale or missing:
        problems.append(f"index is behind the lake: stale {stale[:10]}, missing {missing[:10]}")
    want = np.sort(np.concatenate([p.uids for k, p in survivors.items() if k in manifest.partitions] or
                                  [np.zeros(0, np.int64)]))
    got = np.sort(ids.column(R.UID).to_numpy())
    if not stale and not missing and (len(want) != len(got) or (want != got).any()):
        problems.append(f"index uids differ from dedupe survivors: {len(got)} indexed, {len(want)} survivors")
    return problems
