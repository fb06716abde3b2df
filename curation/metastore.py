"""The metadata of an index generation, keyed by uid: what search hits are described and filtered by, read without
scanning the lake.

`write_metastore` runs with every index generation (curation.index commits it with the index): one row per
indexed uid, sorted by uid, with the pair's url and caption, its scores, sizes, language and crawl, where its
image lives in the lake's shards, and where its embedding row is (partition npy and row), written as an
uncompressed Arrow IPC file. `MetaStore.open` memory-maps it: opening costs nothing that grows with the lake,
a uid lookup is a binary search in the mapped uid column, and a filter is a vectorised pass over mapped columns.
Beside it, `aesthetic-NNNNNN.npy` holds the mean embedding of the images at each aesthetic rating 0-9, the query
shift clip-retrieval's `aesthetic_score` applies.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from curation import io
from curation import records as R
from curation.layout import EMBEDDING_FILES, UIDS_FILE, Lake, Partition, join
from curation.sql import KEPT_VIEW, connect_kept

EMB_PART = "emb_part"  # index into the store's partition list (schema metadata)
EMB_ROW = "emb_row"  # row of the uid in that partition's embedding npy files
AESTHETIC_RATINGS = 10  # clip-retrieval's aesthetic_score: an integer rating 0-9
# Columns a hit carries (besides uid) and the ones filters may bound.
HIT_COLUMNS = (R.URL, R.CAPTION, R.LANGUAGE, R.CRAWL, R.SEGMENT, R.SIMILARITY, R.AESTHETIC, R.PUNSAFE,
               R.PWATERMARK, R.NSFW_TAG, R.ORIGINAL_WIDTH, R.ORIGINAL_HEIGHT, R.WIDTH, R.HEIGHT, R.SHA256)
RANGE_COLUMNS = (R.AESTHETIC, R.PUNSAFE, R.PWATERMARK, R.SIMILARITY, R.ORIGINAL_WIDTH, R.ORIGINAL_HEIGHT)
_DICTIONARY = (R.LANGUAGE, R.CRAWL, R.SEGMENT, R.NSFW_TAG)  # few distinct values: filters compare codes
_PARTS_KEY = b"curation.partitions"
_POINTERS = pa.schema([(R.UID, pa.int64()), (R.CRAWL, pa.string()), (R.SEGMENT, pa.string()), (EMB_PART, pa.int32()),
                       (EMB_ROW, pa.int32())])


def write_metastore(lake_root: str, ids: pa.Table, modality: str, path: str, aesthetic_path: str) -> int:
    """Write the store for the uids of an index generation (`ids`: uid, crawl, segment) to `path` and the
    per-rating mean embeddings to `aesthetic_path`; returns the row count. Raises ValueError when an indexed uid
    is missing from the lake's kept pairs (the index and the lake disagree)."""
    parts = sorted({(c, s) for c, s in zip(ids.column(R.CRAWL).to_pylist(), ids.column(R.SEGMENT).to_pylist(),
                                           strict=True)})
    pointers = _embedding_pointers(lake_root, parts)
    con, _ = connect_kept(lake_root)
    con.register("_ids", ids.select([R.UID, R.CRAWL, R.SEGMENT]))
    con.register("_ptr", pointers)
    cols = ", ".join(f"k.{c}" for c in HIT_COLUMNS)
    # (uid, crawl, segment): the same (url, text) may sit in two partitions; the index holds the surviving one.
    table = con.sql(f"SELECT k.uid, {cols}, k.{R.SOURCE_SHARD}, k.{R.SOURCE_KEY}, p.{EMB_PART}, p.{EMB_ROW} "
                    f"FROM _ids i JOIN {KEPT_VIEW} k USING (uid, crawl, segment) "
                    f"JOIN _ptr p USING (uid, crawl, segment) ORDER BY k.uid").to_arrow_table()
    if table.num_rows != ids.num_rows:
        raise ValueError(f"{ids.num_rows - table.num_rows} indexed uids are not among the lake's kept pairs with an "
                         "embedding: rebuild the index (curation index build --force)")
    for name in _DICTIONARY:
        table = table.set_column(table.schema.get_field_index(name), name, pc.dictionary_encode(table.column(name)))
    meta = {_PARTS_KEY: json.dumps([list(p) for p in parts]).encode()}
    table = table.replace_schema_metadata(meta).combine_chunks()
    with io.atomic_path(path) as tmp, pa.OSFile(tmp, "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    store = MetaStore(table, [Partition(c, s) for c, s in parts], lake_root, modality)
    _write_npy(aesthetic_means(store), aesthetic_path)
    return table.num_rows


def _embedding_pointers(lake_root: str, parts: Sequence[tuple[str, str]]) -> pa.Table:
    """(uid, emb_part, emb_row) of every embedded uid of the partitions, from their uids.npy."""
    lake = Lake(lake_root)
    chunks = []
    for i, (crawl, segment) in enumerate(parts):
        uids = io.read_npy(join(lake.embeddings_dir(Partition(crawl, segment)), UIDS_FILE)).astype(np.int64)
        n = len(uids)
        chunks.append(pa.table({R.UID: uids, R.CRAWL: [crawl] * n, R.SEGMENT: [segment] * n,
                                EMB_PART: np.full(n, i, np.int32), EMB_ROW: np.arange(n, dtype=np.int32)},
                               schema=_POINTERS))
    return pa.concat_tables(chunks) if chunks else _POINTERS.empty_table()


def _write_npy(array: np.ndarray, path: str) -> None:
    with io.atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


@dataclass
class MetaStore:
    """A generation's metadata, memory-mapped: uid lookups, filter masks and embedding rows."""

    table: pa.Table
    partitions: list[Partition]
    lake_root: str
    modality: str
    _uids: np.ndarray = field(init=False, repr=False)
    _embeddings: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False)
    _numeric: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self._uids = self.table.column(R.UID).to_numpy()

    @classmethod
    def open(cls, path: str, lake_root: str, modality: str) -> MetaStore:
        """Map a store written by `write_metastore` (local files: zero copy; nothing is read until used)."""
        fs, p = io.filesystem(path)
        source = pa.memory_map(p) if io.is_local(path) else pa.BufferReader(fs.cat_file(p))
        table = ipc.open_file(source).read_all()
        parts = json.loads((table.schema.metadata or {}).get(_PARTS_KEY, b"[]"))
        return cls(table, [Partition(c, s) for c, s in parts], lake_root, modality)

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def uids(self) -> np.ndarray:
        """Every uid, sorted."""
        return self._uids

    def positions(self, uids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row of each uid, -1 where the store does not hold it."""
        want = np.asarray(uids, dtype=np.int64)
        if not len(self._uids):
            return np.full(len(want), -1, np.int64)
        at = np.searchsorted(self._uids, want)
        at = np.minimum(at, len(self._uids) - 1)
        return np.where(self._uids[at] == want, at, -1)

    def rows(self, positions: np.ndarray, columns: Sequence[str] = HIT_COLUMNS) -> list[dict[str, Any]]:
        """The named columns of the rows at `positions` (all >= 0), as dicts, in that order."""
        taken = self.table.select(list(columns)).take(pa.array(positions, pa.int64()))
        return taken.to_pylist()

    def column(self, name: str) -> pa.ChunkedArray:
        return self.table.column(name)

    def numeric(self, name: str) -> np.ndarray:
        """A numeric column as float64 with NaN for null, converted once per store."""
        if name not in self._numeric:
            col = self.table.column(name).combine_chunks().cast(pa.float64())
            self._numeric[name] = np.asarray(col.fill_null(np.nan).to_numpy(zero_copy_only=False))
        return self._numeric[name]

    def embeddings(self, positions: np.ndarray) -> np.ndarray:
        """float32 embeddings of the rows at `positions` (all >= 0), read from the partitions' memory-mapped npy
        files: the vectors the index was built from."""
        part = self.table.column(EMB_PART).to_numpy()[positions]
        row = self.table.column(EMB_ROW).to_numpy()[positions]
        out: np.ndarray | None = None
        for p in np.unique(part):
            emb = self._partition_embeddings(int(p))
            if out is None:
                out = np.zeros((len(positions), emb.shape[1]), np.float32)
            sel = part == p
            out[sel] = emb[row[sel]]
        return out if out is not None else np.zeros((0, 0), np.float32)

    def _partition_embeddings(self, part: int) -> np.ndarray:
        if part not in self._embeddings:
            emb_dir = Lake(self.lake_root).embeddings_dir(self.partitions[part])
            self._embeddings[part] = io.open_npy(join(emb_dir, EMBEDDING_FILES[self.modality]))
        return self._embeddings[part]

    def mask(self, ranges: Mapping[str, tuple[float | None, float | None]] | None = None,
             values: Mapping[str, Sequence[str]] | None = None) -> np.ndarray:
        """Rows whose `ranges` columns lie within [lo, hi] (None: unbounded; a null value fails a bound) and whose
        `values` columns hold one of the listed values. Unknown columns raise ValueError."""
        keep = np.ones(len(self), dtype=bool)
        for name, (lo, hi) in (ranges or {}).items():
            if name not in RANGE_COLUMNS:
                raise ValueError(f"cannot filter on {name!r}; ranges apply to {list(RANGE_COLUMNS)}")
            if lo is None and hi is None:
                continue
            data = self.numeric(name)
            with np.errstate(invalid="ignore"):
                if lo is not None:
                    keep &= data >= lo
                if hi is not None:
                    keep &= data <= hi
        for name, allowed in (values or {}).items():
            if name not in _DICTIONARY:
                raise ValueError(f"cannot filter on {name!r}; value lists apply to {list(_DICTIONARY)}")
            col = self.table.column(name).combine_chunks()
            dictionary = col.dictionary.to_pylist()
            codes = [i for i, v in enumerate(dictionary) if v in set(allowed)]
            indices = col.indices.fill_null(-1).to_numpy(zero_copy_only=False)
            keep &= np.isin(indices, np.array(codes, dtype=indices.dtype))
        return keep


def aesthetic_means(store: MetaStore, batch: int = 65_536) -> np.ndarray:
    """[AESTHETIC_RATINGS, d] float32: the L2-normalised mean embedding of the images whose aesthetic score rounds to
    each rating (zeros for a rating no image has), what clip-retrieval shifts a query by."""
    if not len(store):
        return np.zeros((AESTHETIC_RATINGS, 0), np.float32)
    scores = store.numeric(R.AESTHETIC)
    rating = np.clip(np.round(scores), 0, AESTHETIC_RATINGS - 1)
    rated = np.flatnonzero(~np.isnan(scores))
    sums = np.zeros((AESTHETIC_RATINGS, store.embeddings(np.arange(1)).shape[1]), np.float64)
    for start in range(0, len(rated), batch):
        pos = rated[start:start + batch]
        emb, r = store.embeddings(pos), rating[pos]
        for value in np.unique(r):
            sums[int(value)] += emb[r == value].sum(axis=0, dtype=np.float64)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return np.divide(sums, norms, out=np.zeros_like(sums), where=norms > 0).astype(np.float32)
