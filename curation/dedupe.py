"""Global, incremental, idempotent dedupe of the lake's image-text pairs, in layers from exact to near duplicates.

Layers, strongest first (a row's `reason` is the strongest layer of any link it has):

1. `duplicate_url_text`: the same (url, text), compared through a 128-bit blake2b key of both. The same pair
   can sit in two partitions: `extract_pairs` only excludes uids of partitions finished before it started.
2. `duplicate_bytes`: the same downloaded original (`downloads.sha256`).
3. `near_duplicate_phash`: pHashes (`clip.phash`) within `radius` bits.
4. `near_duplicate_embedding` (optional): image-embedding cosine >= `embedding_threshold`.

Clusters are the connected components over every link of every partition of every crawl taken so far. Each
cluster keeps one survivor: the highest CLIP similarity, then the larger original (width*height), then the
earliest (crawl, segment) in string order, then the smallest uid. `cluster_id` is the survivor's uid.

Incremental state, under `<root>/dedupe/_state/`, with `state.json` as the commit point (written after the
dedupe tables it describes and before their markers, so a visible dedupe partition always agrees with it):

- `state.json`: format, generation, the config the state was built with, and per partition the digest of its
  inputs (see `input_digest`) and of the dedupe rows last written for it.
- `gen-NNNNNN/nodes.parquet`: one row per participating pair: crawl, segment, uid, url_text_key, sha256,
  phash, similarity, original_width, original_height.
- `gen-NNNNNN/phash_edges.parquet`: hash_a < hash_b (distinct pHash values, as uint64 bits in int64),
  distance; every pair of distinct values present in nodes within the radius, and nothing else.
- `gen-NNNNNN/embedding_edges.parquet`: (crawl, segment, uid) of both ends, similarity; every pair of nodes at
  or above the threshold (empty unless `use_embeddings`).

Why links are stored this way: equal keys (url_text_key, sha256, the same pHash) are regrouped from nodes on
every run with one sort, so a group of k copies costs k-1 links rather than k^2 stored edges and removing a
partition can never break a group. Near-duplicate pHash links are stored between distinct hash *values*, so an
image copied 10,000 times is searched and stored once. When partitions arrive, only pHash values not yet in the
state are searched (against all values, old and new, through `HammingIndex`), and only the new nodes'
embeddings are range-searched (against all nodes): old pairs are never matched again. A partition whose input
digest changed is dropped (its nodes, its embedding edges, and pHash edges of values no other node holds) and
read again; a changed config rebuilds the state from every partition it holds. Hence dedupe_lake(A) followed by
dedupe_lake(A + B) writes exactly what dedupe_lake(A + B) writes, and a rerun with unchanged inputs writes
nothing. One writer at a time: the caller serialises runs (one global Dagster asset).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from curation import io
from curation import records as R
from curation.hamming import BITS, HammingIndex
from curation.layout import IMG_EMB_FILE, UIDS_FILE, Lake, Partition, join
from curation.phash import to_hex

DEDUPE_SCHEMA = pa.schema([
    (R.UID, pa.int64()),
    (R.PHASH, pa.string()),  # imagehash's str(): 16 hex digits; null when the image has no pHash
    (R.CLUSTER_ID, pa.int64()),
    (R.CLUSTER_SIZE, pa.int32()),
    (R.SURVIVOR, pa.bool_()),
    (R.REASON, pa.string()),
    (R.CRAWL, pa.string()),
    (R.SEGMENT, pa.string()),
])

# Upstream files. The embedding file names are curation.clip's, not imported from there: that module loads torch.
INPUT_STAGES = ("pairs", "downloads", "clip")

# State layout under <root>/dedupe/.
STATE_DIR = "_state"
STATE_FILE = "state.json"
STATE_FORMAT = 1
NODES_FILE = "nodes.parquet"
PHASH_EDGES_FILE = "phash_edges.parquet"
EMBEDDING_EDGES_FILE = "embedding_edges.parquet"
URL_TEXT_KEY = "url_text_key"
HASH_A, HASH_B, DISTANCE = "hash_a", "hash_b", "distance"

NODES_SCHEMA = pa.schema([
    (R.CRAWL, pa.string()),
    (R.SEGMENT, pa.string()),
    (R.UID, pa.int64()),
    (URL_TEXT_KEY, pa.string()),
    (R.SHA256, pa.string()),
    (R.PHASH, pa.int64()),
    (R.SIMILARITY, pa.float32()),
    (R.ORIGINAL_WIDTH, pa.int32()),
    (R.ORIGINAL_HEIGHT, pa.int32()),
])
PHASH_EDGES_SCHEMA = pa.schema([(HASH_A, pa.int64()), (HASH_B, pa.int64()), (DISTANCE, pa.uint8())])
EMBEDDING_EDGES_SCHEMA = pa.schema([
    ("crawl_a", pa.string()), ("segment_a", pa.string()), ("uid_a", pa.int64()),
    ("crawl_b", pa.string()), ("segment_b", pa.string()), ("uid_b", pa.int64()),
    (R.SIMILARITY, pa.float32()),
])
# faiss' inner-product range search keeps scores strictly above its radius and in float32: search a little
# below the threshold and decide on exact float64 cosines, so the decision is symmetric in the two images.
_RANGE_MARGIN = 1e-3


@dataclass(frozen=True)
class DedupeConfig:
    """What counts as a duplicate. Frozen and validated; any change rebuilds the global state.

    radius: pHash Hamming radius in bits (0 = identical pHashes only). Default 6, measured on the sample web's
        pipeline images (256 px shards): radius 6 links 98.2 % of the pairs of planted copies and
        near-duplicates and no pair of distinct images; radius 8 links 100 % but 4 distinct pairs, 10 links 208.
    use_embeddings: also link images whose CLIP image embeddings have cosine >= embedding_threshold (exact
        faiss search of new images against all; reads every partition's embeddings when new ones arrive).
    embedding_threshold: clip-retrieval drops results at cosine >= 0.94.
    only_kept: only clip rows with keep=True take part; otherwise every embedded row (status ok). Rows that
        do not take part get no dedupe row.
    """

    radius: int = 6
    use_embeddings: bool = False
    embedding_threshold: float = 0.94
    only_kept: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.radius, bool) or not isinstance(self.radius, int) or not 0 <= self.radius <= BITS:
            raise ValueError(f"radius must be an int in [0, {BITS}], got {self.radius!r}")
        if not isinstance(self.use_embeddings, bool) or not isinstance(self.only_kept, bool):
            raise ValueError("use_embeddings and only_kept must be booleans")
        t = self.embedding_threshold
        if isinstance(t, bool) or not isinstance(t, int | float) or not -1.0 < t <= 1.0:
            raise ValueError(f"embedding_threshold must be a cosine in (-1, 1], got {t!r}")


class ExampleMember(NamedTuple):
    """One image of an example cluster, enough to find it in the partition's webdataset shards."""

    uid: int
    crawl: str
    segment: str
    shard: str | None
    key: str | None


@dataclass(frozen=True)
class DedupeResult:
    """What a `dedupe_lake` / `forget_partition` run did, and the global picture after it.

    partitions_*: partition keys ("crawl|segment"); rewritten = dedupe tables written by this run.
    edges_by_layer: links the graph was built from (a group of k equal keys counts k-1 links).
    clusters: all clusters, singletons included (= rows left after dedupe); duplicate_clusters: size >= 2.
    cluster_sizes: cluster size -> number of clusters.
    phash_values_searched / embedding_queries: what this run searched (only what was new).
    examples: a few clusters (survivor first) from every layer, for a gallery.
    """

    partitions_added: tuple[str, ...]
    partitions_updated: tuple[str, ...]
    partitions_forgotten: tuple[str, ...]
    partitions_rewritten: tuple[str, ...]
    partitions: int
    nodes: int
    edges_by_layer: dict[str, int]
    clusters: int
    duplicate_clusters: int
    duplicates_removed: int
    by_reason: dict[str, int]
    cluster_sizes: dict[int, int]
    phash_values_searched: int
    embedding_queries: int
    examples: list[list[ExampleMember]] = field(default_factory=list)
    generation: int = 0
    seconds: float = 0.0


def dedupe_lake(lake_root: str, partitions: Sequence[Partition], config: DedupeConfig, *,
                examples: int = 8) -> DedupeResult:
    """Bring the global dedupe state up to date with finished partitions and rewrite changed dedupe tables.

    `partitions`: partitions whose pairs, downloads and clip stages are finished (markers present); new ones are
    added, ones whose inputs changed are replaced, unchanged ones are not read again. Partitions already in the
    state and not listed stay as they are (see `forget_partition`). Clusters are then recomputed over the whole
    state, and `lake.table("dedupe", part)` (DEDUPE_SCHEMA: one row per participating clip row, in clip-table
    order) plus its marker are written for every partition whose rows changed. `examples`: how many example
    clusters to report. Raises FileNotFoundError for a partition with a missing upstream marker, ValueError for
    inconsistent inputs (a clip table without phash, uids missing from pairs/downloads/embeddings).
    """
    return _sync(Lake(lake_root), list(partitions), [], config, examples)


def forget_partition(lake_root: str, partition: Partition, config: DedupeConfig, *,
                     examples: int = 8) -> DedupeResult:
    """Remove a partition from the global state (and its dedupe table), re-cluster the rest and rewrite what
    changed. A partition not in the state is a no-op."""
    return _sync(Lake(lake_root), [], [partition], config, examples)


def state_dir(lake_root: str) -> str:
    """Where the dedupe state lives: `<root>/dedupe/_state`, outside the stage's crawl=*/segment=* glob."""
    return join(Lake(lake_root).stage_dir("dedupe"), STATE_DIR)


def verify_dedupe(lake_root: str, partitions: Sequence[Partition]) -> dict[str, list[str]]:
    """Re-read the written dedupe tables and list what is inconsistent (empty lists when sound).

    "clusters", over every partition of the state plus `partitions`: each cluster_id has exactly one survivor,
    whose uid is the cluster_id; cluster_size equals the rows sharing the cluster_id; reason is null exactly on
    survivors and otherwise one of R.DEDUPE_LAYERS. "rows", per listed partition: a dedupe marker exists and the table
    holds exactly one row per participating clip row (keep=True, or status ok without only_kept).
    """
    lake = Lake(lake_root)
    out: dict[str, list[str]] = {"clusters": [], "rows": []}
    state_file = join(state_dir(lake_root), STATE_FILE)
    if not io.exists(state_file):
        out["rows"].append(f"no dedupe state at {state_file}: dedupe_lake has not run")
        return out
    meta = io.read_json(state_file)
    only_kept = bool(meta["config"]["only_kept"])
    held = {Partition.from_key(k) for k in meta["partitions"]}
    tables = []
    for part in sorted(held | set(partitions), key=_sort_key):
        if not io.exists(lake.marker("dedupe", part)):
            out["rows"].append(f"{part.key}: no dedupe marker")
            continue
        table = _read_parquet(lake.table("dedupe", part))
        tables.append(table)
        if part not in set(partitions):
            continue
        clip = _read_columns(lake.table("clip", part), (R.UID, R.KEEP, R.STATUS))
        mask = (pc.fill_null(clip.column(R.KEEP), False) if only_kept
                else pc.fill_null(pc.equal(clip.column(R.STATUS), R.STATUS_OK), False))
        want = np.sort(clip.filter(mask).column(R.UID).to_numpy())
        got = np.sort(table.column(R.UID).to_numpy())
        if len(got) != len(want) or (got != want).any():
            out["rows"].append(f"{part.key}: {len(got)} dedupe rows for {len(want)} participating clip rows "
                               f"({len(np.setdiff1d(want, got))} missing, {len(np.setdiff1d(got, want))} extra)")
    if not tables:
        return out
    rows = pa.concat_tables(tables)
    cid = rows.column(R.CLUSTER_ID).to_numpy()
    uid = rows.column(R.UID).to_numpy()
    survivor = np.asarray(rows.column(R.SURVIVOR).to_numpy(zero_copy_only=False), dtype=bool)
    size = rows.column(R.CLUSTER_SIZE).to_numpy()
    reason = rows.column(R.REASON).to_pylist()
    ids, inverse, counts = np.unique(cid, return_inverse=True, return_counts=True)
    survivors = np.bincount(inverse, weights=survivor, minlength=len(ids)).astype(np.int64)
    for c in ids[survivors != 1][:20]:
        out["clusters"].append(f"cluster {c}: {int(survivors[np.searchsorted(ids, c)])} survivors")
    for i in np.flatnonzero(survivor & (uid != cid))[:20]:
        out["clusters"].append(f"uid {uid[i]} survives cluster {cid[i]} but is not its cluster_id")
    for i in np.flatnonzero(size != counts[inverse])[:20]:
        out["clusters"].append(f"uid {uid[i]}: cluster_size {size[i]}, but {counts[inverse][i]} rows share "
                               f"cluster {cid[i]}")
    bad = [i for i, (r, s) in enumerate(zip(reason, survivor.tolist(), strict=True))
           if (r is None) != s or (r is not None and r not in R.DEDUPE_LAYERS)]
    out["clusters"] += [f"uid {uid[i]}: survivor={bool(survivor[i])} with reason {reason[i]!r}" for i in bad[:20]]
    return out


# ----------------------------------------------------------------------------------------------- state


@dataclass
class _State:
    generation: int
    config: dict[str, Any]
    partitions: dict[str, dict[str, str]]  # key -> {"input": digest, "output": digest}
    nodes: pa.Table
    phash_edges: pa.Table
    embedding_edges: pa.Table


def _gen_dir(root: str, generation: int) -> str:
    return join(root, f"gen-{generation:06d}")


def _empty(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def _read_parquet(path: str, columns: Sequence[str] | None = None) -> pa.Table:
    fs, p = io.filesystem(path)
    return pq.read_table(p, columns=list(columns) if columns is not None else None, filesystem=fs)


def _load_state(lake: Lake) -> _State | None:
    root = state_dir(lake.root)
    path = join(root, STATE_FILE)
    if not io.exists(path):
        return None
    meta = io.read_json(path)
    if meta.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}, this code reads {STATE_FORMAT}; delete "
                         f"{root} to rebuild the dedupe state from the lake")
    gen = _gen_dir(root, int(meta["generation"]))
    return _State(
        generation=int(meta["generation"]),
        config=meta["config"],
        partitions=meta["partitions"],
        nodes=_read_parquet(join(gen, NODES_FILE)).cast(NODES_SCHEMA),
        phash_edges=_read_parquet(join(gen, PHASH_EDGES_FILE)).cast(PHASH_EDGES_SCHEMA),
        embedding_edges=_read_parquet(join(gen, EMBEDDING_EDGES_FILE)).cast(EMBEDDING_EDGES_SCHEMA),
    )


def _commit_state(lake: Lake, state: _State) -> None:
    """Write a new generation's tables, then state.json (the commit point), then drop older generations."""
    root = state_dir(lake.root)
    gen = _gen_dir(root, state.generation)
    io.write_parquet(state.nodes, join(gen, NODES_FILE))
    io.write_parquet(state.phash_edges, join(gen, PHASH_EDGES_FILE))
    io.write_parquet(state.embedding_edges, join(gen, EMBEDDING_EDGES_FILE))
    io.write_json({"format": STATE_FORMAT, "generation": state.generation, "config": state.config,
                   "partitions": state.partitions}, join(root, STATE_FILE))
    _drop_other_generations(root, state.generation)


def _drop_other_generations(root: str, generation: int) -> None:
    """Remove every generation folder but the committed one: older ones once state.json names a newer one, and
    whatever a killed run left (an uncommitted generation, or the previous one when it died right after the commit)."""
    fs, p = io.filesystem(root)
    for entry in fs.ls(p, detail=False):
        name = str(entry).rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("gen-") and name != f"gen-{generation:06d}":
            fs.rm(entry, recursive=True)


# ----------------------------------------------------------------------------------------------- inputs


def input_digest(lake_root: str, part: Partition) -> str:
    """Digest of a partition's upstream markers (bytes and modification time) and table sizes.

    A re-materialised stage rewrites its marker, so any rerun upstream changes the digest. Raises
    FileNotFoundError when a stage is not finished.
    """
    lake = Lake(lake_root)
    h = hashlib.sha256()
    for stage in INPUT_STAGES:
        marker = lake.marker(stage, part)
        fs, p = io.filesystem(marker)
        if not fs.exists(p):
            raise FileNotFoundError(f"{part.key}: no {stage} success marker at {marker}; dedupe reads finished "
                                    f"partitions only (materialise {stage} for it first)")
        with fs.open(p, "rb") as f:
            h.update(f.read())
        try:
            modified = str(fs.modified(p))
        except (NotImplementedError, AttributeError, KeyError):
            modified = ""
        table = lake.table(stage, part)
        tfs, tp = io.filesystem(table)
        size = tfs.size(tp) if tfs.exists(tp) else -1
        h.update(f"|{stage}|{modified}|{size}|".encode())
    return h.hexdigest()


def _url_text_key(url: str | None, text: str | None) -> str:
    u, t = (url or "").encode(), (text or "").encode()
    # Length-prefixed, so no (url, text) split of the same characters can collide.
    return hashlib.blake2b(len(u).to_bytes(8, "little") + u + t, digest_size=16).hexdigest()


def _positions(keys: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    """Row of each `wanted` uid in `keys` (unique uids); ValueError naming `what` when one is missing."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    pos = np.minimum(np.searchsorted(sorted_keys, wanted), max(len(keys) - 1, 0))
    found = sorted_keys[pos] == wanted if len(keys) else np.zeros(len(wanted), dtype=bool)
    if not found.all():
        raise ValueError(f"{int((~found).sum())} uids have no row in {what} (e.g. uid {int(wanted[~found][0])})")
    return order[pos]


def _read_columns(path: str, columns: Sequence[str]) -> pa.Table:
    """Read `columns` of a parquet table; ValueError naming the ones it lacks (e.g. a clip table without phash)."""
    fs, p = io.filesystem(path)
    missing = [c for c in columns if c not in pq.read_schema(p, filesystem=fs).names]
    if missing:
        raise ValueError(f"{path} lacks columns {missing}; rematerialise that stage with the current code")
    return pq.read_table(p, columns=list(columns), filesystem=fs)


def _read_partition(lake: Lake, part: Partition, config: DedupeConfig) -> pa.Table:
    """The nodes of one finished partition (NODES_SCHEMA), in clip-table order."""
    clip_path = lake.table("clip", part)
    clip = _read_columns(clip_path, (R.UID, R.SIMILARITY, R.KEEP, R.STATUS, R.PHASH))
    if config.only_kept:
        mask = pc.fill_null(clip.column(R.KEEP), False)
    else:
        mask = pc.fill_null(pc.equal(clip.column(R.STATUS), R.STATUS_OK), False)
    clip = clip.filter(mask)
    uids = clip.column(R.UID).to_numpy()
    if len(np.unique(uids)) != len(uids):
        raise ValueError(f"{clip_path} has duplicate uids")

    pairs_path = lake.table("pairs", part)
    pairs = _read_columns(pairs_path, (R.UID, R.URL, R.TEXT))
    at = pa.array(_positions(pairs.column(R.UID).to_numpy(), uids, pairs_path))
    urls = pairs.column(R.URL).take(at).to_pylist()
    texts = pairs.column(R.TEXT).take(at).to_pylist()
    keys = [_url_text_key(u, t) for u, t in zip(urls, texts, strict=True)]

    dl_path = lake.table("downloads", part)
    downloads = _read_columns(dl_path, (R.UID, R.SHA256, R.ORIGINAL_WIDTH, R.ORIGINAL_HEIGHT))
    at = pa.array(_positions(downloads.column(R.UID).to_numpy(), uids, dl_path))
    n = len(uids)
    return pa.table({
        R.CRAWL: pa.array([part.crawl] * n, pa.string()),
        R.SEGMENT: pa.array([part.segment] * n, pa.string()),
        R.UID: pa.array(uids, pa.int64()),
        URL_TEXT_KEY: pa.array(keys, pa.string()),
        R.SHA256: downloads.column(R.SHA256).take(at).cast(pa.string()),
        R.PHASH: clip.column(R.PHASH).cast(pa.int64()),
        R.SIMILARITY: clip.column(R.SIMILARITY).cast(pa.float32()),
        R.ORIGINAL_WIDTH: downloads.column(R.ORIGINAL_WIDTH).take(at).cast(pa.int32()),
        R.ORIGINAL_HEIGHT: downloads.column(R.ORIGINAL_HEIGHT).take(at).cast(pa.int32()),
    }, schema=NODES_SCHEMA)


def _read_embeddings(lake: Lake, part: Partition, uids: np.ndarray) -> np.ndarray:
    """The L2-normalised float32 image embeddings of `uids` (rows in that order) from the partition's npy files."""
    emb_dir = lake.embeddings_dir(part)
    emb = io.read_npy(join(emb_dir, IMG_EMB_FILE))
    emb_uids = io.read_npy(join(emb_dir, UIDS_FILE)).astype(np.int64)
    if emb.ndim != 2 or len(emb) != len(emb_uids):
        raise ValueError(f"{emb_dir}: {IMG_EMB_FILE} of shape {emb.shape} does not match {len(emb_uids)} uids")
    rows = emb[_positions(emb_uids, uids, f"{emb_dir}/{UIDS_FILE}")].astype(np.float32)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


# ----------------------------------------------------------------------------------------------- matching


def _u64(values: np.ndarray) -> np.ndarray:
    return values.astype(np.int64).view(np.uint64)


def _distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values (a plain sort: numpy 2.4's hash-based np.unique is ~4x slower on uint64)."""
    out = np.sort(values)
    return out[np.r_[True, out[1:] != out[:-1]]] if len(out) else out


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """values[i] in sorted_set, by binary search."""
    if len(sorted_set) == 0:
        return np.zeros(len(values), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[pos] == values


def _present_hashes(nodes: pa.Table) -> np.ndarray:
    col = nodes.column(R.PHASH).combine_chunks()
    return _distinct(_u64(col.drop_null().to_numpy()))


def _match_phash(old_values: np.ndarray, new_values: np.ndarray, radius: int) -> pa.Table:
    """Edges between distinct pHash values within `radius`: new values against old and new ones.

    old_values and new_values: disjoint sorted uint64 arrays. Old-vs-old pairs are already in the state.
    """
    if radius == 0 or len(new_values) == 0:
        return _empty(PHASH_EDGES_SCHEMA)
    n_old = len(old_values)
    index = HammingIndex(old_values, np.arange(n_old, dtype=np.int64))
    index.add(new_values, n_old + np.arange(len(new_values), dtype=np.int64))
    found = index.search(new_values, radius)
    other = found.ids
    # New-vs-new pairs come back in both directions and each value finds itself: keep each once.
    keep = (other < n_old) | (other - n_old > found.query)
    values = np.concatenate([old_values, new_values])
    a, b = new_values[found.query[keep]], values[other[keep]]
    return _sorted_phash_edges(np.minimum(a, b), np.maximum(a, b), found.distance[keep])


def _sorted_phash_edges(a: np.ndarray, b: np.ndarray, d: np.ndarray) -> pa.Table:
    order = np.lexsort((b, a))
    return pa.table({HASH_A: a[order].view(np.int64), HASH_B: b[order].view(np.int64),
                     DISTANCE: d[order].astype(np.uint8)}, schema=PHASH_EDGES_SCHEMA)


def _match_embeddings(old: tuple[pa.Table, np.ndarray, np.ndarray], new: tuple[pa.Table, np.ndarray, np.ndarray],
                      threshold: float) -> pa.Table:
    """Edges between nodes whose embeddings have cosine >= threshold: new nodes against old and new ones.

    old/new: (canonical nodes, their partition ranks, L2-normalised float32 embeddings [n, d]) in row order.
    """
    import faiss  # only this layer needs it

    (old_nodes, old_ranks, old_emb), (new_nodes, new_ranks, new_emb) = old, new
    if len(new_emb) == 0:
        return _empty(EMBEDDING_EDGES_SCHEMA)
    if len(old_emb) and old_emb.shape[1] != new_emb.shape[1]:
        raise ValueError(f"image embeddings of different widths ({old_emb.shape[1]} and {new_emb.shape[1]}): "
                         "dedupe by embedding needs one CLIP model across the lake (or use_embeddings=False)")
    n_old = len(old_emb)
    base = np.ascontiguousarray(np.concatenate([old_emb, new_emb]) if n_old else new_emb)
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    lims, _, found = index.range_search(np.ascontiguousarray(new_emb), float(threshold) - _RANGE_MARGIN)
    query = n_old + np.repeat(np.arange(len(new_emb), dtype=np.int64), np.diff(lims).astype(np.int64))
    found = found.astype(np.int64)
    # New-vs-new pairs come back in both directions and each image finds itself: keep each once.
    keep = (found < n_old) | (found > query)
    query, found = query[keep], found[keep]
    cosine = np.einsum("nd,nd->n", base[query].astype(np.float64), base[found].astype(np.float64))
    hit = cosine >= threshold
    query, found, cosine = query[hit], found[hit], cosine[hit]

    ends = (R.CRAWL, R.SEGMENT, R.UID)
    both = pa.concat_tables([old_nodes.select(list(ends)), new_nodes.select(list(ends))])
    rank = np.concatenate([old_ranks, new_ranks])
    uid = both.column(R.UID).to_numpy()
    # Orient every edge from the smaller (crawl, segment, uid) end, so the state depends on the edges alone.
    swap = (rank[query] > rank[found]) | ((rank[query] == rank[found]) & (uid[query] > uid[found]))
    first, second = both.take(pa.array(np.where(swap, found, query))), both.take(pa.array(np.where(swap, query, found)))
    cols = {f"{c}_a": first.column(c) for c in ends} | {f"{c}_b": second.column(c) for c in ends}
    table = pa.table({**cols, R.SIMILARITY: pa.array(cosine.astype(np.float32))}).select(EMBEDDING_EDGES_SCHEMA.names)
    return _sort_embedding_edges(table.cast(EMBEDDING_EDGES_SCHEMA))


def _sort_embedding_edges(table: pa.Table) -> pa.Table:
    keys = ("crawl_a", "segment_a", "uid_a", "crawl_b", "segment_b", "uid_b")
    return table.sort_by([(k, "ascending") for k in keys])


# ----------------------------------------------------------------------------------------------- clustering


def _sort_key(part: Partition) -> tuple[str, str]:
    return (part.crawl, part.segment)


def _partition_ranks(nodes: pa.Table, order: Sequence[Partition], suffix: str = "") -> np.ndarray:
    """Rank in `order` of each row's partition (columns crawl+suffix, segment+suffix); `order` must hold them all."""
    if nodes.num_rows == 0:
        return np.zeros(0, dtype=np.int64)
    encoded = pc.dictionary_encode(_partition_keys(nodes, suffix).combine_chunks())
    rank_of = {p.key: i for i, p in enumerate(order)}
    lookup = np.array([rank_of[k] for k in encoded.dictionary.to_pylist()], dtype=np.int64)
    return lookup[encoded.indices.to_numpy()]


def _partition_keys(table: pa.Table, suffix: str = "") -> pa.ChunkedArray:
    return pc.binary_join_element_wise(table.column(R.CRAWL + suffix), table.column(R.SEGMENT + suffix), "|")


def _canonical(nodes: pa.Table, order: Sequence[Partition]) -> pa.Table:
    """Nodes sorted by partition (crawl, segment), keeping each partition's own row order."""
    ranks = _partition_ranks(nodes, order)
    return nodes.take(pa.array(np.lexsort((np.arange(len(ranks)), ranks)))) if len(ranks) else nodes


def _codes(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Dense codes of equal values (int64), -1 for nulls."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return pc.dictionary_encode(arr).indices.fill_null(-1).to_numpy().astype(np.int64)


def _equal_links(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Chain links (a, b) through every group of equal non-negative codes: a group of k costs k-1 links."""
    valid = np.flatnonzero(codes >= 0)
    order = valid[np.argsort(codes[valid], kind="stable")]
    same = codes[order[1:]] == codes[order[:-1]]
    return order[:-1][same], order[1:][same]


def _linked(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    mask[a] = True
    mask[b] = True
    return mask


@dataclass(frozen=True)
class _Clusters:
    cluster_id: np.ndarray  # int64 [n]
    cluster_size: np.ndarray  # int32 [n]
    survivor: np.ndarray  # bool [n]
    reason: np.ndarray  # int8 [n]: index into R.DEDUPE_LAYERS, -1 for survivors
    label: np.ndarray  # int64 [n]: component
    rank_in_cluster: np.ndarray  # int64 [n]: 0 for the survivor, then the survivor order
    edges_by_layer: dict[str, int]


def _cluster(nodes: pa.Table, ranks: np.ndarray, phash_edges: pa.Table, embedding_edges: pa.Table,
             order: Sequence[Partition]) -> _Clusters:
    """Connected components over all layers, survivors, cluster ids and reasons for canonical nodes."""
    n = nodes.num_rows
    if n == 0:
        none = np.zeros(0, dtype=np.int64)
        return _Clusters(none, none.astype(np.int32), none.astype(bool), none.astype(np.int8), none, none, {})
    uid = nodes.column(R.UID).to_numpy()
    links: list[tuple[np.ndarray, np.ndarray]] = []
    has = np.zeros((len(R.DEDUPE_LAYERS), n), dtype=bool)
    counts: dict[str, int] = {}

    def link(layer: str, a: np.ndarray, b: np.ndarray) -> None:
        links.append((a, b))
        has[R.DEDUPE_LAYERS.index(layer)] |= _linked(n, a, b)
        counts[layer] = counts.get(layer, 0) + len(a)

    link(R.DUPLICATE_URL_TEXT, *_equal_links(_codes(nodes.column(URL_TEXT_KEY))))
    link(R.DUPLICATE_BYTES, *_equal_links(_codes(nodes.column(R.SHA256))))

    phash_col = nodes.column(R.PHASH).combine_chunks()
    has_phash = ~np.asarray(phash_col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    hashes = _u64(phash_col.fill_null(0).to_numpy())
    link(R.NEAR_DUPLICATE_PHASH, *_equal_links(np.where(has_phash, _codes(phash_col), -1)))
    with_hash = np.flatnonzero(has_phash)
    by_value = with_hash[np.argsort(hashes[with_hash], kind="stable")]
    first = np.r_[True, hashes[by_value[1:]] != hashes[by_value[:-1]]] if len(by_value) else np.zeros(0, bool)
    holder = by_value[first]  # one node per distinct value (equal values are chained above)
    values = hashes[holder]
    ea, eb = _u64(phash_edges.column(HASH_A).to_numpy()), _u64(phash_edges.column(HASH_B).to_numpy())
    if len(ea):
        pa_, pb_ = np.searchsorted(values, ea), np.searchsorted(values, eb)
        link(R.NEAR_DUPLICATE_PHASH, holder[pa_], holder[pb_])  # other holders of a value are chained to it above

    if embedding_edges.num_rows:
        starts = np.searchsorted(ranks, np.arange(len(order) + 1))
        a = _locate(embedding_edges, "a", uid, starts, order)
        b = _locate(embedding_edges, "b", uid, starts, order)
        link(R.NEAR_DUPLICATE_EMBEDDING, a, b)

    all_a = np.concatenate([x for x, _ in links] + [np.zeros(0, np.int64)])
    all_b = np.concatenate([y for _, y in links] + [np.zeros(0, np.int64)])
    graph = coo_matrix((np.ones(len(all_a), dtype=np.int8), (all_a, all_b)), shape=(n, n)).tocsr()
    _, label = connected_components(graph, directed=False)
    label = label.astype(np.int64)

    sim = nodes.column(R.SIMILARITY).combine_chunks().fill_null(float("-inf")).to_numpy().astype(np.float64)
    sim = np.where(np.isnan(sim), -np.inf, sim)
    width = nodes.column(R.ORIGINAL_WIDTH).combine_chunks().fill_null(0).to_numpy().astype(np.int64)
    height = nodes.column(R.ORIGINAL_HEIGHT).combine_chunks().fill_null(0).to_numpy().astype(np.int64)
    # Survivor order: similarity desc, area desc, (crawl, segment) asc (= partition rank), uid asc.
    best_first = np.lexsort((uid, ranks, -(width * height), -sim, label))
    sorted_label = label[best_first]
    group_start = np.r_[0, np.flatnonzero(np.diff(sorted_label)) + 1]
    survivor_of_label = np.empty(int(label.max()) + 1, dtype=np.int64)
    survivor_of_label[sorted_label[group_start]] = best_first[group_start]
    rank_in_cluster = np.empty(n, dtype=np.int64)
    starts_per_row = np.repeat(group_start, np.diff(np.r_[group_start, n]))
    rank_in_cluster[best_first] = np.arange(n) - starts_per_row
    survivor = rank_in_cluster == 0
    reason = np.where(has.any(axis=0), np.argmax(has, axis=0), -1).astype(np.int8)
    reason[survivor] = -1
    size = np.bincount(label, minlength=len(survivor_of_label))[label].astype(np.int32)
    return _Clusters(cluster_id=uid[survivor_of_label[label]], cluster_size=size, survivor=survivor, reason=reason,
                     label=label, rank_in_cluster=rank_in_cluster, edges_by_layer=counts)


def _locate(edges: pa.Table, end: str, uid: np.ndarray, starts: np.ndarray, order: Sequence[Partition]) -> np.ndarray:
    """Node index of each edge's `end` ("a"/"b") among canonical nodes (partition r at starts[r]:starts[r+1])."""
    ranks = _partition_ranks(edges, order, f"_{end}")
    uids = edges.column(f"uid_{end}").to_numpy()
    out = np.empty(len(uids), dtype=np.int64)
    for r in np.unique(ranks):
        rows = np.flatnonzero(ranks == r)
        lo, hi = starts[r], starts[r + 1]
        out[rows] = lo + _positions(uid[lo:hi], uids[rows], f"dedupe state nodes of {order[r].key}")
    return out


# ----------------------------------------------------------------------------------------------- outputs


def _output_digest(config: dict[str, Any], uid: np.ndarray, hashes: np.ndarray, has_phash: np.ndarray,
                   clusters: _Clusters, rows: slice) -> str:
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for arr in (uid[rows], hashes[rows], has_phash[rows], clusters.cluster_id[rows], clusters.cluster_size[rows],
                clusters.survivor[rows], clusters.reason[rows]):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _output_table(part: Partition, uid: np.ndarray, hashes: np.ndarray, has_phash: np.ndarray,
                  clusters: _Clusters, rows: slice) -> pa.Table:
    n = len(uid[rows])
    reasons = [R.DEDUPE_LAYERS[r] if r >= 0 else None for r in clusters.reason[rows].tolist()]
    hexes = [to_hex(h) if ok else None for h, ok in zip(hashes[rows].tolist(), has_phash[rows].tolist(), strict=True)]
    return pa.table({
        R.UID: pa.array(uid[rows], pa.int64()),
        R.PHASH: pa.array(hexes, pa.string()),
        R.CLUSTER_ID: pa.array(clusters.cluster_id[rows], pa.int64()),
        R.CLUSTER_SIZE: pa.array(clusters.cluster_size[rows], pa.int32()),
        R.SURVIVOR: pa.array(clusters.survivor[rows], pa.bool_()),
        R.REASON: pa.array(reasons, pa.string()),
        R.CRAWL: pa.array([part.crawl] * n, pa.string()),
        R.SEGMENT: pa.array([part.segment] * n, pa.string()),
    }, schema=DEDUPE_SCHEMA)


def _write_table(lake: Lake, part: Partition, table: pa.Table, config: dict[str, Any]) -> dict[str, Any]:
    """Replace a partition's dedupe table, its marker removed first; return the marker to write once the state
    that describes the table is committed."""
    io.remove(lake.marker("dedupe", part))
    io.write_parquet(table, lake.table("dedupe", part))
    reasons = Counter(r for r in table.column(R.REASON).to_pylist() if r is not None)
    survivors = int(pc.sum(table.column(R.SURVIVOR)).as_py() or 0)
    return {"rows": table.num_rows, "survivors": survivors, "duplicates": table.num_rows - survivors,
            "by_reason": dict(sorted(reasons.items())), "config": config}


def _examples(lake: Lake, nodes: pa.Table, clusters: _Clusters, count: int, members: int = 8
              ) -> list[list[ExampleMember]]:
    """Up to `count` clusters of size >= 2, taking turns over the weakest layer that holds each together
    (embedding, pHash, bytes, url/text), largest first; each survivor first, at most `members` images."""
    if count <= 0 or nodes.num_rows == 0:
        return []
    label, n_labels = clusters.label, int(clusters.label.max()) + 1
    weakest = np.full(n_labels, -1, dtype=np.int64)
    np.maximum.at(weakest, label, clusters.reason.astype(np.int64))
    sizes = np.bincount(label, minlength=n_labels)
    cid = np.zeros(n_labels, dtype=np.int64)
    cid[label] = clusters.cluster_id
    queues: list[list[int]] = []
    for layer in reversed(range(len(R.DEDUPE_LAYERS))):
        candidates = np.flatnonzero((weakest == layer) & (sizes >= 2))
        queues.append(candidates[np.lexsort((cid[candidates], -sizes[candidates]))][:count].tolist())
    chosen = [q[i] for i in range(count) for q in queues if i < len(q)][:count]
    out: list[list[ExampleMember]] = []
    for lab in chosen:
        rows = np.flatnonzero(label == lab)
        rows = rows[np.argsort(clusters.rank_in_cluster[rows])][:members]
        picked = nodes.take(pa.array(rows))
        out.append([ExampleMember(u, c, s, None, None) for u, c, s in zip(
            picked.column(R.UID).to_pylist(), picked.column(R.CRAWL).to_pylist(),
            picked.column(R.SEGMENT).to_pylist(), strict=True)])
    # Shard and key from the downloads tables of the partitions involved, reading only the rows shown.
    for crawl, segment in sorted({(m.crawl, m.segment) for cluster in out for m in cluster}):
        uids = [m.uid for cluster in out for m in cluster if (m.crawl, m.segment) == (crawl, segment)]
        table = _read_parquet(lake.table("downloads", Partition(crawl, segment)), [R.UID, R.SHARD, R.KEY])
        table = table.filter(pc.is_in(table.column(R.UID), value_set=pa.array(uids, pa.int64())))
        where = {u: (sh, k) for u, sh, k in zip(table.column(R.UID).to_pylist(), table.column(R.SHARD).to_pylist(),
                                                 table.column(R.KEY).to_pylist(), strict=True)}
        for cluster in out:
            for i, m in enumerate(cluster):
                if (m.crawl, m.segment) == (crawl, segment) and m.uid in where:
                    cluster[i] = m._replace(shard=where[m.uid][0], key=where[m.uid][1])
    return out


# ----------------------------------------------------------------------------------------------- the run


class _Graph(NamedTuple):
    """Nodes and stored links, in the state's schemas."""

    nodes: pa.Table
    phash_edges: pa.Table
    embedding_edges: pa.Table


@dataclass
class _Plan:
    """What a run starts from and what it changes, decided from the state and the input digests."""

    rebuild: bool  # the state was built under another config
    kept: _Graph  # the state's tables, before the changed and forgotten partitions are dropped
    meta: dict[str, dict[str, str]]  # the new state's partitions: key -> {"input": digest, "output": digest}
    changed: list[Partition]  # partitions to read: new ones and ones whose input digest changed
    forgotten: list[str]  # keys of the state's partitions to remove
    added: tuple[str, ...]
    updated: tuple[str, ...]


def _sync(lake: Lake, add: list[Partition], forget: list[Partition], config: DedupeConfig,
          examples: int) -> DedupeResult:
    """Add or replace `add`, remove `forget`, re-cluster and write what changed (see `dedupe_lake`)."""
    started = time.perf_counter()
    cfg = asdict(config)
    state = _load_state(lake)
    plan = _plan_run(lake, state, add, forget, cfg)
    kept = _drop_partitions(plan.kept, [p.key for p in plan.changed] + plan.forgotten)
    new_nodes = (pa.concat_tables([_read_partition(lake, p, config) for p in plan.changed]) if plan.changed
                 else _empty(NODES_SCHEMA))
    phash_edges, phash_values_searched = _merge_phash_edges(kept, new_nodes, config.radius)
    order = sorted((Partition.from_key(k) for k in plan.meta), key=_sort_key)
    embedding_edges, embedding_queries = _merge_embedding_edges(lake, kept, new_nodes, order, config)
    nodes = _canonical(pa.concat_tables([kept.nodes, new_nodes]), order)
    ranks = _partition_ranks(nodes, order)
    clusters = _cluster(nodes, ranks, phash_edges, embedding_edges, order)

    for key in plan.forgotten:
        io.clear_partition(lake.partition_dir("dedupe", Partition.from_key(key)))
    markers = _write_tables(lake, nodes, ranks, order, clusters, plan.meta, cfg)
    # Tables, then the state (the commit point), then their markers: every dedupe partition a reader sees agrees
    # with the committed state. A crash before the markers leaves the rewritten partitions hidden; the next run
    # finds their markers missing and writes them again.
    if state is None or plan.rebuild or plan.changed or plan.forgotten or plan.meta != state.partitions:
        generation = (state.generation if state is not None else 0) + 1
        _commit_state(lake, _State(generation, cfg, plan.meta, nodes, phash_edges, embedding_edges))
    else:
        generation = state.generation
        _drop_other_generations(state_dir(lake.root), generation)
    for part, marker in markers:
        io.write_marker(lake.partition_dir("dedupe", part), marker)
    return _result(lake, plan, nodes, clusters, examples, partitions=len(order),
                   rewritten=tuple(part.key for part, _ in markers), phash_values_searched=phash_values_searched,
                   embedding_queries=embedding_queries, generation=generation, started=started)


def _plan_run(lake: Lake, state: _State | None, add: list[Partition], forget: list[Partition],
              cfg: dict[str, Any]) -> _Plan:
    """From the loaded state (None before the first run), the partitions to add and to forget and the config:
    what the run keeps, reads again and removes. Raises FileNotFoundError for an unfinished partition in `add`."""
    known = dict(state.partitions) if state is not None else {}
    forget_keys = {p.key for p in forget}
    rebuild = state is not None and state.config != cfg
    if state is None or rebuild:
        # No state yet, or one built under another config: rebuild it from every partition it held.
        add = [*(Partition.from_key(k) for k in known), *add]
        meta: dict[str, dict[str, str]] = {}
        kept = _Graph(_empty(NODES_SCHEMA), _empty(PHASH_EDGES_SCHEMA), _empty(EMBEDDING_EDGES_SCHEMA))
    else:
        meta = {k: dict(v) for k, v in known.items() if k not in forget_keys}
        kept = _Graph(state.nodes, state.phash_edges, state.embedding_edges)
    changed: list[Partition] = []
    digests: dict[str, str] = {}
    for part in sorted({p for p in add if p.key not in forget_keys}, key=_sort_key):
        digests[part.key] = input_digest(lake.root, part)
        if meta.get(part.key, {}).get("input") != digests[part.key]:
            changed.append(part)
    for part in changed:
        meta[part.key] = {"input": digests[part.key], "output": ""}  # the output digest once its table is written
    return _Plan(rebuild=rebuild, kept=kept, meta=meta, changed=changed,
                 forgotten=sorted(k for k in forget_keys if k in known),
                 added=tuple(p.key for p in changed if p.key not in known),
                 updated=tuple(p.key for p in changed if p.key in known))


def _drop_partitions(graph: _Graph, keys: Sequence[str]) -> _Graph:
    """The graph without the nodes of the partitions `keys`, their embedding edges and pHash edges of values no
    remaining node holds."""
    dropped = pa.array(sorted(set(keys)), pa.string())
    if not len(dropped):
        return graph
    nodes = graph.nodes.filter(pc.invert(pc.is_in(_partition_keys(graph.nodes), value_set=dropped)))
    emb = graph.embedding_edges
    for end in ("_a", "_b"):
        emb = emb.filter(pc.invert(pc.is_in(_partition_keys(emb, end), value_set=dropped)))
    present = _present_hashes(nodes)
    phash = graph.phash_edges
    a, b = _u64(phash.column(HASH_A).to_numpy()), _u64(phash.column(HASH_B).to_numpy())
    return _Graph(nodes, phash.filter(pa.array(_member(a, present) & _member(b, present))), emb)


def _merge_phash_edges(kept: _Graph, new_nodes: pa.Table, radius: int) -> tuple[pa.Table, int]:
    """All pHash edges (sorted): the kept ones plus matches of pHash values not yet in `kept.nodes`; and how many
    values were searched."""
    old_values = _present_hashes(kept.nodes)
    new_values = _present_hashes(new_nodes)
    new_values = new_values[~_member(new_values, old_values)]
    merged = pa.concat_tables([kept.phash_edges, _match_phash(old_values, new_values, radius)])
    edges = _sorted_phash_edges(_u64(merged.column(HASH_A).to_numpy()), _u64(merged.column(HASH_B).to_numpy()),
                                merged.column(DISTANCE).to_numpy())
    return edges, len(new_values) if radius > 0 else 0


def _merge_embedding_edges(lake: Lake, kept: _Graph, new_nodes: pa.Table, order: Sequence[Partition],
                           config: DedupeConfig) -> tuple[pa.Table, int]:
    """All embedding edges: the kept ones plus the new nodes' matches (only with use_embeddings); and how many
    nodes were queried. `order`: every partition of the new state."""
    if not (config.use_embeddings and new_nodes.num_rows):
        return kept.embedding_edges, 0
    old_sorted, new_sorted = _canonical(kept.nodes, order), _canonical(new_nodes, order)
    old_ranks, new_ranks = _partition_ranks(old_sorted, order), _partition_ranks(new_sorted, order)
    fresh = _match_embeddings(
        (old_sorted, old_ranks, _embeddings_of(lake, old_sorted, old_ranks, order)),
        (new_sorted, new_ranks, _embeddings_of(lake, new_sorted, new_ranks, order)),
        config.embedding_threshold)
    return _sort_embedding_edges(pa.concat_tables([kept.embedding_edges, fresh])), new_nodes.num_rows


def _write_tables(lake: Lake, nodes: pa.Table, ranks: np.ndarray, order: Sequence[Partition], clusters: _Clusters,
                  meta: dict[str, dict[str, str]], cfg: dict[str, Any]) -> list[tuple[Partition, dict[str, Any]]]:
    """Write the dedupe table of each partition in `order` whose rows changed or whose marker is missing, and
    record its output digest in `meta`; return (partition, marker) to write once the state is committed."""
    uid = nodes.column(R.UID).to_numpy()
    phash_col = nodes.column(R.PHASH).combine_chunks()
    has_phash = ~np.asarray(phash_col.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    hashes = _u64(phash_col.fill_null(0).to_numpy())
    starts = np.searchsorted(ranks, np.arange(len(order) + 1))
    markers: list[tuple[Partition, dict[str, Any]]] = []
    for r, part in enumerate(order):
        rows = slice(int(starts[r]), int(starts[r + 1]))
        digest = _output_digest(cfg, uid, hashes, has_phash, clusters, rows)
        if meta[part.key]["output"] != digest or not io.exists(lake.marker("dedupe", part)):
            markers.append((part, _write_table(lake, part, _output_table(part, uid, hashes, has_phash, clusters, rows),
                                               cfg)))
            meta[part.key]["output"] = digest
    return markers


def _result(lake: Lake, plan: _Plan, nodes: pa.Table, clusters: _Clusters, examples: int, *, partitions: int,
            rewritten: tuple[str, ...], phash_values_searched: int, embedding_queries: int, generation: int,
            started: float) -> DedupeResult:
    """The run's DedupeResult from its plan, the clustered nodes and what it searched and wrote."""
    sizes = Counter(np.bincount(clusters.label).tolist()) if nodes.num_rows else Counter()
    by_reason = Counter(R.DEDUPE_LAYERS[r] for r in clusters.reason.tolist() if r >= 0)
    n_clusters = int(clusters.survivor.sum())
    return DedupeResult(
        partitions_added=plan.added,
        partitions_updated=plan.updated,
        partitions_forgotten=tuple(plan.forgotten),
        partitions_rewritten=rewritten,
        partitions=partitions,
        nodes=nodes.num_rows,
        edges_by_layer={layer: clusters.edges_by_layer.get(layer, 0) for layer in R.DEDUPE_LAYERS},
        clusters=n_clusters,
        duplicate_clusters=sum(c for s, c in sizes.items() if s >= 2),
        duplicates_removed=nodes.num_rows - n_clusters,
        by_reason={layer: by_reason.get(layer, 0) for layer in R.DEDUPE_LAYERS},
        cluster_sizes=dict(sorted(sizes.items())),
        phash_values_searched=phash_values_searched,
        embedding_queries=embedding_queries,
        examples=_examples(lake, nodes, clusters, examples),
        generation=generation,
        seconds=time.perf_counter() - started,
    )


def _embeddings_of(lake: Lake, nodes: pa.Table, ranks: np.ndarray, order: Sequence[Partition]) -> np.ndarray:
    """Embeddings of canonical nodes (each partition's rows contiguous), read partition by partition."""
    uid = nodes.column(R.UID).to_numpy()
    cuts = np.r_[0, np.flatnonzero(np.diff(ranks)) + 1, len(ranks)]
    chunks = [_read_embeddings(lake, order[ranks[lo]], uid[lo:hi]) for lo, hi in itertools.pairwise(cuts) if hi > lo]
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)
