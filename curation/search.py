"""Search over a committed index generation: text, image and vector queries, filters applied before top-k,
clip-retrieval's result post-processing, and every hit described from the generation's metadata store.

- `Generation` is one committed index generation, loaded whole: the faiss index (nprobe set), its metadata store
  (curation.metastore, memory-mapped) and its per-rating aesthetic embeddings. A hit is a uid the index holds, so
  a uid that left the index never comes back from a later generation.
- `SearchEngine` serves the latest generation of a lake and picks up a new one without a restart: it checks the
  manifest's generation at most every `reload_interval_s` and loads a new generation in a background thread,
  answering from the previous one meanwhile.
- Filters (`Filters`: bounds on scores and sizes, languages, crawls, membership in a subset's latest release, and
  clip-retrieval's safety switches) become a boolean mask over the store's rows and then a faiss `IDSelector`, so
  the index only ever returns rows that pass: every one of the k hits satisfies the filter. With a selective
  filter an IVF index probes proportionally more lists (up to all of them: exact over the passing rows).
- Takedowns (curation.blocklist): a uid a takedown list matched is never returned, from the moment the list is
  ingested (`<lake>/takedowns/taken_down.parquet`), not from the index rebuild that later leaves it out. Every search
  stats that file (`BlockedUids.refresh`); while the generation holds none of its uids (the normal case,
  and always after the rebuild) the search is unchanged. Otherwise an unfiltered search excludes them with
  `IDSelectorNot(IDSelectorBatch(blocked here))` and a filtered one drops them from its mask, so k hits still come
  back when k other rows pass; the selectors are cached per (filters, blocklist version), so an ingest replaces
  them. `mask` leaves them out too, so saved searches (curation.saved_queries) never match them. Measured on a
  10k x 512 flat index, one query on one core (~1.4 ms): the stat is ~25 us; the exclusion selector with 5 or 1,000
  held uids was within the run-to-run noise (10 %) of the plain search.
- `deduplicate` is clip-retrieval's: connected components of the results at image-embedding cosine >= 0.94, the
  best-ranked of each kept. `aesthetic_score`/`aesthetic_weight` shift the query by the mean embedding of the
  images at that rating, computed from this lake (clip-retrieval downloads LAION's).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from curation import io
from curation import records as R
from curation.blocklist import BlockedUids
from curation.index import HNSW_QUANTIZER_MIN_LISTS, Manifest, index_dir, load_index
from curation.layout import join
from curation.metastore import AESTHETIC_RATINGS, HIT_COLUMNS, RANGE_COLUMNS, MetaStore
from curation.safety import PUNSAFE_FLAG, TAG_NSFW

DEDUPE_COSINE = 0.94  # clip-retrieval's near-duplicate threshold for results
MAX_K = 10_000
_SELECTOR_CACHE = 32  # filter masks kept per generation (paging through one filtered search reuses its selector)
_NONE = np.zeros(0, np.int64)


@dataclass(frozen=True)
class Hit:
    uid: int
    score: float
    fields: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"uid": self.uid, "score": round(self.score, 6), **self.fields}


@dataclass(frozen=True)
class Filters:
    """What every hit must satisfy. `ranges`: (column, lo, hi) over RANGE_COLUMNS, inclusive, None unbounded;
    `languages`/`crawls`: allowed values ('' is "no reliable language"); `subset`: in that subset's latest
    release; `safe`: punsafe below LAION's 0.5 flag (use_safety_model); `no_nsfw_tag`: the zero-shot tag from the
    unsafe prompt sets is not NSFW (use_violence_detector)."""

    ranges: tuple[tuple[str, float | None, float | None], ...] = ()
    languages: tuple[str, ...] | None = None
    crawls: tuple[str, ...] | None = None
    subset: str | None = None
    safe: bool = False
    no_nsfw_tag: bool = False

    def __post_init__(self) -> None:
        for name, lo, hi in self.ranges:
            if name not in RANGE_COLUMNS:
                raise ValueError(f"cannot filter on {name!r}; bounds apply to {list(RANGE_COLUMNS)}")
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"the bounds on {name} are empty: min {lo} > max {hi}")

    @property
    def empty(self) -> bool:
        return not (self.ranges or self.languages is not None or self.crawls is not None or self.subset
                    or self.safe or self.no_nsfw_tag)

    @classmethod
    def from_request(cls, data: Mapping[str, Any], *, safe: bool = False, no_nsfw_tag: bool = False) -> Filters:
        """From request fields `min_<column>` / `max_<column>` (RANGE_COLUMNS), `language`, `crawl` (a string or a
        list of strings) and `subset`. Raises ValueError naming a field of the wrong type."""
        ranges = []
        for name in RANGE_COLUMNS:
            lo, hi = (_number(data, f"{side}_{name}") for side in ("min", "max"))
            if lo is not None or hi is not None:
                ranges.append((name, lo, hi))
        subset = data.get("subset")
        if subset is not None and not isinstance(subset, str):
            raise ValueError("subset must be the name of a subset")
        return cls(tuple(ranges), _strings(data, "language"), _strings(data, "crawl"), subset or None, safe,
                   no_nsfw_tag)

    def to_request(self) -> dict[str, Any]:
        """The request fields `from_request` reads back into these filters (with `use_safety_model` and
        `use_violence_detector` for the two switches); only what is set, so no filter is an empty mapping."""
        out: dict[str, Any] = {}
        for name, lo, hi in self.ranges:
            out |= {f"{side}_{name}": v for side, v in (("min", lo), ("max", hi)) if v is not None}
        out |= {k: list(v) for k, v in (("language", self.languages), ("crawl", self.crawls)) if v is not None}
        out |= {k: v for k, v in (("subset", self.subset), ("use_safety_model", self.safe),
                                  ("use_violence_detector", self.no_nsfw_tag)) if v}
        return out


def _number(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{key} must be a number")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{key} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{key} must be a finite number")
    return number


def _strings(data: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
    value = data.get(key)
    if value is None:
        return None
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{key} must be a string or a list of strings")
    return tuple(values)


@dataclass(frozen=True)
class TakenDown:
    """The taken-down uids a generation still holds, at one version of the lake's blocklist: `uids` (ascending) and
    their store `rows`. Empty in the normal case: the index rebuilt after an ingest leaves them out."""

    version: int
    uids: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.uids)


@dataclass
class Generation:
    """One committed index generation: faiss index, metadata store and aesthetic embeddings, and the lake's
    blocklist, whose uids it never returns (see the module docstring)."""

    manifest: Manifest
    index: faiss.Index
    store: MetaStore
    aesthetic: np.ndarray
    lake_root: str
    _selectors: OrderedDict[tuple[Filters, int], tuple[Any, int]] = field(default_factory=OrderedDict, repr=False)
    _releases: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _blocked: BlockedUids = field(init=False, repr=False)
    _taken_down: TakenDown = field(default_factory=lambda: TakenDown(-1, _NONE, _NONE), repr=False)
    _blocked_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._blocked = BlockedUids(self.lake_root)

    @classmethod
    def load(cls, lake_root: str, modality: str = "image") -> Generation:
        """The lake's committed generation (FileNotFoundError with the fix when none is built)."""
        loaded = load_index(lake_root, modality)
        out = index_dir(lake_root, modality)
        manifest = loaded.manifest
        store = MetaStore.open(join(out, manifest.meta_file), lake_root, modality)
        if len(store) != manifest.vectors:
            raise RuntimeError(f"generation {manifest.generation}: the metadata store holds {len(store)} rows for "
                               f"{manifest.vectors} vectors; rebuild the index")
        return cls(manifest, loaded.index, store, io.read_npy(join(out, manifest.aesthetic_file)), lake_root)

    def search(self, queries: np.ndarray, k: int, filters: Filters = Filters()) -> list[list[tuple[int, float]]]:
        """Top-k (store row, score) per query among the rows that pass `filters` (best first; fewer than k when fewer
        rows pass)."""
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.manifest.dim:
            raise ValueError(f"queries have dimension {q.shape[1]}, the index {self.manifest.dim} "
                             f"({self.manifest.clip_model}): encode them with the model that built it")
        k = min(k, self.manifest.vectors)
        if k < 1:
            return [[] for _ in q]
        blocked = self.taken_down()
        if filters.empty and not len(blocked):  # the hot path: one stat more than before takedowns
            scores, uids = self.index.search(q, k)
        else:
            selector, passing = self._selector(filters, blocked)
            if passing == 0:
                return [[] for _ in q]
            params = self._params(selector, passing)
            scores, uids = self.index.search(q, k, params=params[0])
            if (uids == -1).any() and self.manifest.family != "flat":  # too few passing rows in the probed lists
                params = self._params(selector, passing, widen=True)
                scores, uids = self.index.search(q, k, params=params[0])
        out = []
        for srow, urow in zip(scores, uids, strict=True):
            found = urow != -1
            rows = self.store.positions(urow[found])
            out.append([(int(r), float(s)) for r, s in zip(rows, srow[found], strict=True) if r >= 0])
        return out

    def taken_down(self) -> TakenDown:
        """The taken-down uids this generation holds, re-read when the lake's taken_down.parquet changed (one stat)."""
        with self._blocked_lock:
            uids = self._blocked.refresh()
            if self._taken_down.version != self._blocked.version:
                rows = self.store.positions(uids) if len(uids) else _NONE
                held = rows >= 0
                self._taken_down = TakenDown(self._blocked.version, uids[held], rows[held])
            return self._taken_down

    def taken_down_by(self, uid: int) -> str | None:
        """The list that took `uid` down (whether or not this generation holds it), else None."""
        with self._blocked_lock:
            return self._blocked.list_of(uid)

    def blocked_uids(self) -> int:
        """How many uids the lake's takedown lists took down so far (held here or not)."""
        with self._blocked_lock:
            return len(self._blocked.refresh())

    def mask(self, filters: Filters) -> np.ndarray:
        """The store rows that pass `filters` and were not taken down."""
        return self._mask(filters, self.taken_down())

    def _mask(self, filters: Filters, blocked: TakenDown) -> np.ndarray:
        values: dict[str, Sequence[str]] = {}
        if filters.languages is not None:
            values[R.LANGUAGE] = filters.languages
        if filters.crawls is not None:
            values[R.CRAWL] = filters.crawls
        keep = self.store.mask({name: (lo, hi) for name, lo, hi in filters.ranges}, values)
        if filters.safe:  # an image with no punsafe score has no head to judge it: kept, as clip-retrieval would
            keep &= ~(np.nan_to_num(self.store.numeric(R.PUNSAFE), nan=0.0) >= PUNSAFE_FLAG)
        if filters.no_nsfw_tag:
            keep &= ~self.store.mask(values={R.NSFW_TAG: (TAG_NSFW,)})
        if filters.subset:
            keep &= np.isin(self.store.uids, self._release_uids(filters.subset), assume_unique=True)
        keep[blocked.rows] = False
        return keep

    def _selector(self, filters: Filters, blocked: TakenDown) -> tuple[Any, int]:
        """(faiss selector, rows it passes) for `filters` minus the taken-down rows, cached per blocklist version."""
        key = (filters, blocked.version)
        with self._lock:
            if key in self._selectors:
                self._selectors.move_to_end(key)
                return self._selectors[key]
        entry: tuple[Any, int]
        if filters.empty:  # only takedowns to leave out: exclude those few rather than list every other row
            entry = (faiss.IDSelectorNot(faiss.IDSelectorBatch(blocked.uids)), self.manifest.vectors - len(blocked))
        else:
            passing = self.store.uids[self._mask(filters, blocked)]
            entry = (faiss.IDSelectorBatch(passing), len(passing))
        with self._lock:
            for stale in [k for k in self._selectors if k[1] != blocked.version]:
                del self._selectors[stale]  # an ingest changed what every selector excludes
            self._selectors[key] = entry
            while len(self._selectors) > _SELECTOR_CACHE:
                self._selectors.popitem(last=False)
        return entry

    def _params(self, selector: Any, passing: int, *, widen: bool = False) -> list[Any]:
        """Search parameters restricted to `selector` (the outermost first; the list keeps the SWIG objects alive for
        the search). An IVF index probes more lists the fewer rows pass: nprobe / sqrt(share) at first, and
        nprobe / share (`widen`: as many passing candidates as an unfiltered search sees) when that left a query
        with fewer than k hits; at most every list, which is exact over the passing rows. The square root is
        measured, not derived: at 1M vectors and a 10 % filter, nprobe 16 -> 51 lists gave filtered recall@40 1.00
        (unfiltered: 0.97) at a third of the 160 lists' time (benchmarks/bench_serve.py, docs/PERFORMANCE.md)."""
        if self.manifest.family == "flat":
            flat = faiss.SearchParameters()
            flat.sel = selector
            return [flat]
        share = passing / max(1, self.manifest.vectors)
        ivf = faiss.SearchParametersIVF()
        ivf.sel = selector
        ivf.nprobe = min(self.manifest.nlist, math.ceil(self.manifest.nprobe / (share if widen else math.sqrt(share))))
        chain: list[Any] = [ivf]
        if self.manifest.nlist > HNSW_QUANTIZER_MIN_LISTS:  # an HNSW coarse quantizer
            hnsw = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # not in faiss's stubs
            hnsw.efSearch = max(2 * ivf.nprobe, 16)
            ivf.quantizer_params = hnsw
            chain.append(hnsw)
        if self.manifest.family == "ivf_pq":  # OPQ rotation in front of the IVF index
            rotation = faiss.SearchParametersPreTransform()
            rotation.index_params = ivf
            chain.insert(0, rotation)
        return chain

    def _release_uids(self, name: str) -> np.ndarray:
        from curation.subsets import latest_release, read_release

        latest = latest_release(self.lake_root, name)
        if latest is None:
            raise ValueError(f"subset {name!r} has no release in this lake")
        key = (name, int(latest["release"]))
        if key not in self._releases:
            table = read_release(self.lake_root, name, latest)
            self._releases[key] = np.unique(table.column(R.UID).to_numpy())
        return self._releases[key]

    def describe(self, rows: Sequence[int]) -> list[dict[str, Any]]:
        """uid plus HIT_COLUMNS of each store row."""
        positions = np.asarray(rows, dtype=np.int64)
        fields = self.store.rows(positions, (R.UID, *HIT_COLUMNS))
        return fields

    def shift_by_aesthetic(self, query: np.ndarray, rating: int, weight: float) -> np.ndarray:
        """clip-retrieval's aesthetic query shift: query + weight x the mean embedding of images rated `rating`."""
        if not 0 <= rating < AESTHETIC_RATINGS:
            raise ValueError(f"aesthetic_score must be an integer rating 0-{AESTHETIC_RATINGS - 1}, got {rating}")
        shifted = np.atleast_2d(query).astype(np.float32) + weight * self.aesthetic[rating]
        return shifted / np.maximum(np.linalg.norm(shifted, axis=1, keepdims=True), 1e-12)

    def near_duplicates(self, rows: Sequence[int]) -> set[int]:
        """Positions (into `rows`, which are ranked best first) of results that are near-duplicates of a better one:
        connected components at cosine >= DEDUPE_COSINE over their image embeddings, the first of each kept."""
        if len(rows) < 2:
            return set()
        emb = self.store.embeddings(np.asarray(rows, dtype=np.int64))
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        a, b = np.nonzero(np.triu(emb @ emb.T >= DEDUPE_COSINE, k=1))
        if not len(a):
            return set()
        graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(len(rows), len(rows)))
        _, label = connected_components(graph, directed=False)
        first: dict[int, int] = {}
        dropped = set()
        for i, lab in enumerate(label.tolist()):
            if lab in first:
                dropped.add(i)
            else:
                first[lab] = i
        return dropped


class SearchEngine:
    """The latest committed generation of a lake's index, reloaded in the background when a new one is committed."""

    def __init__(self, lake_root: str, modality: str = "image", reload_interval_s: float = 1.0) -> None:
        self.lake_root = lake_root
        self.modality = modality
        self.reload_interval_s = reload_interval_s
        self._generation = Generation.load(lake_root, modality)
        self._checked = time.monotonic()
        self._loading = False
        self._lock = threading.Lock()
        self.reloads = 0
        self.reload_errors = 0

    def current(self) -> Generation:
        """The generation to answer from; starts loading a newer one when the manifest names it."""
        now = time.monotonic()
        if now - self._checked >= self.reload_interval_s:
            self._checked = now
            manifest = Manifest.load(self.lake_root, self.modality)
            if manifest is not None and manifest.generation != self._generation.manifest.generation:
                self._start_reload()
        return self._generation

    def wait_for_generation(self, generation: int, timeout_s: float = 60.0) -> Generation:
        """Block until `generation` (or a later one) is being served (tests, and `curation serve` at start)."""
        deadline = time.monotonic() + timeout_s
        while self.current().manifest.generation < generation:
            if time.monotonic() > deadline:
                raise TimeoutError(f"generation {generation} was not loaded within {timeout_s} s")
            time.sleep(0.05)
        return self._generation

    def _start_reload(self) -> None:
        with self._lock:
            if self._loading:
                return
            self._loading = True
        threading.Thread(target=self._reload, name="index-reload", daemon=True).start()

    def _reload(self) -> None:
        try:
            fresh = Generation.load(self.lake_root, self.modality)
            self._generation = fresh  # one reference swap: requests in flight keep the generation they started with
            self.reloads += 1
        except (OSError, ValueError, RuntimeError):
            self.reload_errors += 1  # a generation being replaced under us: the next check retries
        finally:
            with self._lock:
                self._loading = False


class QueryEncoder:
    """The CLIP towers of a models spec, for queries; refused unless it is the model whose embeddings the index
    holds (`manifest`), since vectors of two models share no space."""

    def __init__(self, spec: Mapping[str, Any], manifest: Manifest, device: str = "auto") -> None:
        from curation.clip import load_clip
        from curation.models import checkpoint_identity
        from curation.scoring import ScoringConfig

        config = ScoringConfig.from_spec(spec, device=device, precision="fp32" if device == "cpu" else "fp16")
        want = (manifest.clip_model, manifest.clip_checkpoint)
        have = (config.clip.model_name, checkpoint_identity(config.clip.pretrained))
        if have != want:
            raise ValueError(f"the models spec gives {have[0]} {have[1]}, but the index was built from {want[0]} "
                             f"{want[1]} embeddings: pass the spec the clip asset used (--spec)")
        self.clip = load_clip(config.clip)
        self.model_name = config.clip.model_name

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        """[n, d] float32 unit vectors from the text tower."""
        return self.clip.encode_texts(list(texts))

    def images(self, images: Sequence[Any]) -> np.ndarray:
        """[n, d] float32 unit vectors from the image tower (PIL images)."""
        return self.clip.encode_images(list(images))


def hits(generation: Generation, ranked: Sequence[tuple[int, float]]) -> list[Hit]:
    """(store row, score) results as hits with the store's fields."""
    described = generation.describe([r for r, _ in ranked])
    return [Hit(int(f.pop(R.UID)), score, f) for f, (_, score) in zip(described, ranked, strict=True)]


def search_text(lake_root: str, texts: Sequence[str], spec: Mapping[str, Any], k: int = 10,
                modality: str = "image", device: str = "auto", filters: Filters = Filters()) -> list[list[Hit]]:
    """Top-k hits for each text query (text-to-image search over the image index by default)."""
    generation = Generation.load(lake_root, modality)
    queries = QueryEncoder(spec, generation.manifest, device).texts(texts)
    return [hits(generation, ranked) for ranked in generation.search(queries, k, filters)]
