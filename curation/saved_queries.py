"""Saved searches: a query embedding, the search service's filters, and a similarity floor or a top-k, evaluated
exactly over the lake's committed index generation.

A saved query stores the query *vector* (encoded once, when it was saved, by the model that served it, whose name and
checkpoint identity are recorded beside it), so re-evaluating it needs no text or image tower and gives the same
vector every time; an index rebuilt from another model refuses it rather than comparing vectors of two spaces.

`match_query` is exact, not an ANN search: the generation's metadata store gives the rows that pass the filters (the
mask the service turns into its faiss selector, which leaves out every uid a takedown list took down, from the moment
the list is ingested: curation.search) and a chunked scan takes the inner product of the query with each
passing row's stored embedding (the unit vectors the index was built from, so the cosine the service reports).
`min_similarity` keeps every passing row at or above the floor, however many; `top_k` the k best, ties broken by uid.
The scan reads each passing row's float16 embedding once, memory-mapped in chunks (measured: ~0.5 M rows/s of d=512
on one CPU core), with no recall to tune and no k to outgrow.

curation.subsets turns the matches into the `query_matches` table of its sandboxed candidates, so a saved search is
released, diffed and explained exactly as a SQL subset is.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from curation.metastore import RANGE_COLUMNS

if TYPE_CHECKING:
    from curation.index import Manifest
    from curation.search import Filters

MODALITIES = ("image", "text")
SWITCHES = ("use_safety_model", "use_violence_detector")  # clip-retrieval's names for Filters.safe / no_nsfw_tag
FILTER_FIELDS = frozenset({f"{side}_{c}" for side in ("min", "max") for c in RANGE_COLUMNS}
                          | {"language", "crawl", "subset", *SWITCHES})
SCAN_ROWS = 16_384  # embeddings scored per chunk: 32 MiB of float32 at d=512


@dataclass(frozen=True)
class SavedQuery:
    """A search saved as a subset. `embedding`: base64 of the float32 (little-endian) unit query vector of `dim`;
    `filters`: the service's request fields (Filters.to_request); `min_similarity`: a floor on the *query's* cosine
    (the filter on the stored image-caption similarity is `filters`' own `min_similarity`) or `top_k`, exactly one;
    `source` (what was encoded) and `generation` (the index generation it was saved against) are provenance."""

    embedding: str
    dim: int
    modality: str
    clip_model: str
    clip_checkpoint: str
    filters: tuple[tuple[str, Any], ...] = ()
    min_similarity: float | None = None
    top_k: int | None = None
    source: tuple[tuple[str, Any], ...] = ()
    generation: int = 0

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {list(MODALITIES)}, got {self.modality!r}")
        if (self.min_similarity is None) == (self.top_k is None):
            raise ValueError("give exactly one of min_similarity (a cosine floor) and top_k")
        floor = self.min_similarity
        if floor is not None and (isinstance(floor, bool) or not isinstance(floor, int | float)
                                  or not -1.0 <= floor <= 1.0):
            raise ValueError(f"min_similarity must be a cosine in [-1, 1], got {self.min_similarity!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)
                                       or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        self.vector()
        self.search_filters()

    @classmethod
    def from_vector(cls, vector: np.ndarray, manifest: Manifest, modality: str, filters: Filters, *,
                    min_similarity: float | None = None, top_k: int | None = None,
                    source: Mapping[str, Any] | None = None) -> SavedQuery:
        """A query encoded against `manifest`'s generation (its model is recorded), normalised to a unit vector."""
        v = np.asarray(vector, dtype=np.float32).reshape(-1)
        if v.shape[0] != manifest.dim:
            raise ValueError(f"the query has dimension {v.shape[0]}, the index {manifest.dim}")
        norm = float(np.linalg.norm(v))
        if not math.isfinite(norm) or norm == 0:
            raise ValueError("the query embedding must be a finite, non-zero vector")
        unit = (v / norm).astype("<f4")
        return cls(embedding=base64.b64encode(unit.tobytes()).decode(), dim=manifest.dim, modality=modality,
                   clip_model=manifest.clip_model, clip_checkpoint=manifest.clip_checkpoint,
                   filters=_frozen(filters.to_request()), min_similarity=min_similarity, top_k=top_k,
                   source=_frozen(source or {}), generation=manifest.generation)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> SavedQuery:
        """From `record()`'s JSON."""
        known = {"embedding", "dim", "modality", "clip_model", "clip_checkpoint", "filters", "min_similarity",
                 "top_k", "source", "generation"}
        if not isinstance(data, Mapping):
            raise ValueError("a saved query must be a mapping")
        extra = sorted(set(data) - known)
        if extra:
            raise ValueError(f"saved query: unknown keys {extra}; known: {sorted(known)}")
        for key in ("filters", "source"):
            if not isinstance(data.get(key) or {}, Mapping):
                raise ValueError(f"saved query: {key} must be a mapping")
        return cls(embedding=str(data.get("embedding", "")), dim=int(data.get("dim", 0)),
                   modality=str(data.get("modality", "")), clip_model=str(data.get("clip_model", "")),
                   clip_checkpoint=str(data.get("clip_checkpoint", "")), filters=_frozen(data.get("filters") or {}),
                   min_similarity=data.get("min_similarity"), top_k=data.get("top_k"),
                   source=_frozen(data.get("source") or {}), generation=int(data.get("generation", 0)))

    def record(self) -> dict[str, Any]:
        """JSON-ready: what `from_mapping` reads back."""
        return {"embedding": self.embedding, "dim": self.dim, "modality": self.modality,
                "clip_model": self.clip_model, "clip_checkpoint": self.clip_checkpoint,
                "filters": _thawed(self.filters), "min_similarity": self.min_similarity, "top_k": self.top_k,
                "source": _thawed(self.source), "generation": self.generation}

    def vector(self) -> np.ndarray:
        """The float32 unit query vector."""
        try:
            raw = base64.b64decode(self.embedding, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the saved query's embedding is not valid base64") from None
        if self.dim < 1 or len(raw) != 4 * self.dim:
            raise ValueError(f"the saved query's embedding holds {len(raw)} bytes, not {self.dim} float32 values")
        vector = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        norm = float(np.linalg.norm(vector))
        if not math.isfinite(norm) or norm == 0:
            raise ValueError("the saved query's embedding must be a finite, non-zero vector")
        return vector

    def search_filters(self) -> Filters:
        """The filters as the search applies them (ValueError naming a bad or unknown field)."""
        from curation.search import Filters

        data = _thawed(self.filters)
        unknown = sorted(set(data) - FILTER_FIELDS)
        if unknown:
            raise ValueError(f"saved query: unknown filters {unknown}; known: {sorted(FILTER_FIELDS)}")
        switches = [data.get(k, False) for k in SWITCHES]
        if not all(isinstance(s, bool) for s in switches):
            raise ValueError(f"saved query: {' and '.join(SWITCHES)} must be true or false")
        return Filters.from_request(data, safe=switches[0], no_nsfw_tag=switches[1])

    def describe(self) -> str:
        """One line for listings: what was encoded, the selection and the filters."""
        what = ", ".join(f"{k}={v!r}" for k, v in self.source) or "an embedding"
        selection = f"cosine >= {self.min_similarity:g}" if self.min_similarity is not None else f"top {self.top_k}"
        return f"{self.modality} search for {what}: {selection}, filters {_thawed(self.filters)}"


@dataclass(frozen=True)
class QueryMatches:
    """The rows of one index generation a saved query selects: uids (ascending) and their query cosines."""

    uids: np.ndarray
    scores: np.ndarray
    generation: int
    passing: int  # rows that pass the filters (what was scanned)

    def summary(self) -> dict[str, Any]:
        return {"generation": self.generation, "passing_filters": self.passing, "matched": int(self.uids.size),
                "min_score": round(float(self.scores.min()), 6) if self.scores.size else None,
                "max_score": round(float(self.scores.max()), 6) if self.scores.size else None}


def match_query(lake_root: str, query: SavedQuery, chunk_rows: int = SCAN_ROWS) -> QueryMatches:
    """Every row of the lake's committed `query.modality` generation that passes the filters, was not taken down and
    is at or above the floor (or among the top k). Raises ValueError when the index now holds another model's
    embeddings."""
    from curation.search import Generation

    generation = Generation.load(lake_root, query.modality)
    manifest = generation.manifest
    if (manifest.clip_model, manifest.clip_checkpoint, manifest.dim) != (query.clip_model, query.clip_checkpoint,
                                                                         query.dim):
        raise ValueError(f"the query was saved from {query.clip_model} {query.clip_checkpoint} embeddings, but the "
                         f"{query.modality} index (generation {manifest.generation}) holds {manifest.clip_model} "
                         f"{manifest.clip_checkpoint}: save the search again with that model")
    rows = np.flatnonzero(generation.mask(query.search_filters()))
    vector = query.vector()
    scores = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), chunk_rows):
        chunk = rows[start:start + chunk_rows]
        scores[start:start + len(chunk)] = generation.store.embeddings(chunk) @ vector
    uids = generation.store.uids[rows]
    if query.min_similarity is not None:
        chosen = np.flatnonzero(scores >= query.min_similarity)
    else:
        chosen = np.lexsort((uids, -scores))[:query.top_k]  # best first, ties by uid: the same k every time
    order = chosen[np.argsort(uids[chosen], kind="stable")]
    return QueryMatches(uids[order].astype(np.int64), scores[order], manifest.generation, len(rows))


def encode_query(lake_root: str, *, modality: str = "image", text: str | None = None, image_path: str | None = None,
                 embedding: np.ndarray | None = None, spec: Mapping[str, Any] | None = None, device: str = "auto",
                 filters: Mapping[str, Any] | None = None, min_similarity: float | None = None,
                 top_k: int | None = None) -> SavedQuery:
    """A saved query from exactly one of `text`, `image_path` (both encoded by `spec`'s towers, which must be the
    model of the lake's `modality` index) and `embedding` (a vector of that model's space), with the service's
    filter fields (`filters`: request names, e.g. {"min_aesthetic": "6", "language": ["en"]})."""
    from curation.index import Manifest
    from curation.search import Filters, QueryEncoder

    if sum(x is not None for x in (text, image_path, embedding)) != 1:
        raise ValueError("give exactly one of a text, an image and an embedding")
    manifest = Manifest.load(lake_root, modality)
    if manifest is None:
        raise FileNotFoundError(f"no {modality} index in {lake_root}: build one (curation index build)")
    fields = dict(filters or {})
    unknown = sorted(set(fields) - FILTER_FIELDS)
    if unknown:
        raise ValueError(f"unknown filters {unknown}; known: {sorted(FILTER_FIELDS)}")
    switches = [fields.pop(k, False) for k in SWITCHES]
    searched = Filters.from_request(fields, safe=bool(switches[0]), no_nsfw_tag=bool(switches[1]))
    if embedding is not None:
        vector, source = np.asarray(embedding, dtype=np.float32), {"embedding_input": "given"}
    else:
        if spec is None:
            raise ValueError("a text or image query needs the models spec that encodes it (--spec)")
        encoder = QueryEncoder(spec, manifest, device)
        if text is not None:
            vector, source = encoder.texts([text])[0], {"text": text}
        else:
            from PIL import Image

            with Image.open(str(image_path)) as img:
                vector = encoder.images([img.convert("RGB")])[0]
            source = {"image": str(image_path)}
    return SavedQuery.from_vector(vector, manifest, modality, searched, min_similarity=min_similarity, top_k=top_k,
                                  source=source)


def _frozen(data: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A mapping as sorted (key, value) pairs, lists as tuples: hashable, and one spelling per meaning."""
    return tuple(sorted((str(k), tuple(v) if isinstance(v, list | tuple) else v) for k, v in data.items()))


def _thawed(pairs: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in pairs}
