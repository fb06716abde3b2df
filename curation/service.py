"""The search service: a KNN API over a lake's index that clip-retrieval's own clients use unchanged.

`build_app(ServiceConfig(...))` is a Starlette app (`curation serve LAKE` runs it under uvicorn):

- clip-retrieval's API on the wire: `POST /knn-service` (text, image as base64, image_url, embedding_input;
  modality image|text; num_images; num_result_ids; indice_name; deduplicate; use_safety_model; use_violence_detector;
  aesthetic_score + aesthetic_weight; use_mclip accepted), `POST /metadata` ({ids, indice_name} -> [{id, metadata}]),
  `GET /indices-list`, plus `GET /metrics` (Prometheus text) and `GET /health`. Results carry clip-retrieval's `id`
  (the uid), `similarity`, `url` and `caption`, and beyond them every score of the hit; the first `num_images` come
  with metadata, the rest as ids that `/metadata` describes (how clip-front pages).
- Beyond it: filters applied before top-k (`min_`/`max_` + aesthetic, punsafe, pwatermark, similarity (the
  stored image-caption cosine, `caption_similarity` in results), original_width, original_height; `language`,
  `crawl`, `subset`) in the same request body; `GET /image/{uid}`
  serves the image from the lake's own shards, its original URL in the `X-Original-URL` header; `POST /export` (a
  /knn-service body plus `format`: parquet or json) answers those results as an img2dataset input file
  (curation.export); `GET /` is the explorer, a search front-end over this API (curation.explorer).
- Safety: `image_url` is fetched through the SSRF guard (curation.netguard) with a byte cap and a deadline; uploads
  are size-limited and refused from their header when over the pixel limit (no decompression bomb is decoded);
  bound to loopback by default, and a bearer token is required on every endpoint but `/health` when configured
  (`curation serve` refuses another address without one); a per-client token-bucket rate limit; a bad request gets a
  400 with a JSON reason (413 for a body over the limit, 404 for an unknown image, 410 for a taken-down one), an
  internal fault a 500 without a traceback (that goes to the server's log).
- A new index generation is picked up without restart (curation.search.SearchEngine).
- Takedowns: a uid a takedown list matched (curation.blocklist) is gone from every endpoint the moment the list is
  ingested, before the index is rebuilt without it: no search, export or saved search returns it (curation.search),
  `/metadata` gives it an empty object as for an unknown id, `/image/{uid}` answers 410 Gone naming the list
  (no bytes, no URL), and `/explain/{uid}` says only that it was taken down, by which list and when. `/health` and
  `/metrics` (`curation_taken_down_uids`, and `curation_taken_down_in_index_<modality>`: those still awaiting the
  rebuild) count them.
- Provenance: `GET /explain/{uid}` answers everything the lake knows about a sample, kept or dropped at any stage
  (curation.explain): 404 for a uid the lake does not hold.
- Saved searches: `POST /subsets` ({name, description?, query: a /knn-service body, min_similarity | top_k}) encodes
  the query once, saves it with its filters as a subset of the lake and exports its first release (201 with the
  release and its diff; curation.subsets.save_subset); `GET /subsets` lists every subset with its latest release.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import io as _io
import json
import logging
import math
import tarfile
import threading
import time
import urllib.parse
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from curation import records as R
from curation.explain import explain
from curation.explorer import explorer_routes
from curation.export import FORMATS, export_results
from curation.io import filesystem
from curation.layout import Lake, Partition, join
from curation.netguard import NetPolicy, build_guarded_opener
from curation.saved_queries import SavedQuery
from curation.search import MAX_K, Filters, Generation, QueryEncoder, SearchEngine, hits
from curation.subsets import SubsetDefinition, save_subset, subset_summaries

log = logging.getLogger("curation.service")
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
MODALITIES = ("image", "text")
WRITE_ENDPOINTS = ("save_subset",)  # routes that write into the lake: same-origin pages only
CAPTION_SIMILARITY = R.CAPTION_SIMILARITY  # the stored image-caption cosine, beside the query's `similarity`
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
_IMAGE_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


class Gone(LookupError):
    """A uid a takedown list took down: answered 410 Gone with the list, and nothing of the sample."""

    def __init__(self, uid: int, list_name: str) -> None:
        super().__init__(f"uid {uid} was taken down by the takedown list {list_name!r}")
        self.uid, self.list_name = uid, list_name


class BadRequest(ValueError):
    """A request the service refuses: answered `status` (400 unless said) with this message as the JSON reason."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServiceConfig:
    """What `build_app` serves and how defensively. `spec`: the models spec whose towers encode text and image
    queries (None: only embedding_input queries); `url_policy`: where image_url may be fetched from (the downloader's
    rules by default: public addresses only)."""

    lake_root: str
    name: str = "curation"
    spec: dict[str, Any] | None = None
    device: str = "auto"
    token: str | None = None
    rate_per_s: float = 50.0  # per client; the explorer loads a page of up to 120 thumbnails at once
    burst: int = 200
    max_body_bytes: int = 12 << 20  # a request body: a base64 image of up to max_image_bytes fits
    max_image_bytes: int = 8 << 20
    max_image_pixels: int = 89_478_484  # LAION's download limit, checked from the header before decoding
    url_policy: NetPolicy = field(default_factory=NetPolicy)
    url_deadline_s: float = 15.0
    reload_interval_s: float = 1.0
    cors_origins: tuple[str, ...] = ("*",)  # browser origins allowed to call the API (clip-front's, usually)
    subsets_registry: str | None = None  # the registry file (CURATION_SUBSETS), whose names a save may not take

    def __post_init__(self) -> None:
        if self.rate_per_s <= 0 or self.burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        if self.token is not None and len(self.token) < 16:
            raise ValueError("the bearer token must be at least 16 characters")
        if not self.name or any(c in self.name for c in "/ \t"):
            raise ValueError(f"the index name must be a plain word, got {self.name!r}")


class RateLimiter:
    """A token bucket per client address: `burst` requests at once, refilled at `rate_per_s`."""

    def __init__(self, rate_per_s: float, burst: int, max_clients: int = 10_000) -> None:
        self.rate, self.burst, self.max_clients = rate_per_s, float(burst), max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def wait_s(self, client: str) -> float:
        """0 when the request may go ahead (a token is taken), else the seconds until one is available."""
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.pop(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            self._buckets[client] = (tokens - 1 if wait == 0 else tokens, now)
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        return wait


class Metrics:
    """Request counts and latencies per endpoint and status, in Prometheus' text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.buckets: dict[str, list[int]] = defaultdict(lambda: [0] * (len(_LATENCY_BUCKETS) + 1))
        self.sums: dict[str, float] = defaultdict(float)

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            counts = self.buckets[endpoint]
            for i, bound in enumerate((*_LATENCY_BUCKETS, math.inf)):
                if seconds <= bound:
                    counts[i] += 1
            self.sums[endpoint] += seconds

    def render(self, gauges: dict[str, float]) -> str:
        lines = ["# TYPE curation_requests_total counter"]
        with self._lock:
            lines += [f'curation_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines.append("# TYPE curation_request_seconds histogram")
            for endpoint, counts in sorted(self.buckets.items()):
                for bound, n in zip((*_LATENCY_BUCKETS, math.inf), counts, strict=True):
                    le = "+Inf" if bound == math.inf else f"{bound:g}"
                    lines.append(f'curation_request_seconds_bucket{{endpoint="{endpoint}",le="{le}"}} {n}')
                lines.append(f'curation_request_seconds_sum{{endpoint="{endpoint}"}} {self.sums[endpoint]:.6f}')
                lines.append(f'curation_request_seconds_count{{endpoint="{endpoint}"}} {counts[-1]}')
        for name, value in sorted(gauges.items()):
            lines += [f"# TYPE {name} gauge", f"{name} {value:g}"]
        return "\n".join(lines) + "\n"


class Service:
    """The state behind the app: engines per modality, the query encoder, limits and metrics."""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.engines = {"image": SearchEngine(config.lake_root, "image", config.reload_interval_s)}
        with contextlib.suppress(FileNotFoundError):  # no text index: text-modality queries say so
            self.engines["text"] = SearchEngine(config.lake_root, "text", config.reload_interval_s)
        self.limiter = RateLimiter(config.rate_per_s, config.burst)
        self.metrics = Metrics()
        self._encoder: tuple[tuple[str, str], QueryEncoder] | None = None
        self._encoder_lock = threading.Lock()
        self._shards: OrderedDict[str, dict[str, tuple[str, int, int]]] = OrderedDict()
        self._shards_lock = threading.Lock()
        self._save_lock = threading.Lock()  # one save at a time: a second save of a name sees the first and is refused

    def engine(self, modality: str) -> SearchEngine:
        if modality not in MODALITIES:
            raise BadRequest(f"modality must be one of {list(MODALITIES)}, got {modality!r}")
        if modality not in self.engines:
            raise BadRequest(f"no {modality} index in this lake: build one (curation index build --modality "
                             f"{modality})")
        return self.engines[modality]

    def encoder(self, generation: Generation) -> QueryEncoder:
        """The query encoder for the generation's model (reloaded when a new generation changed the model)."""
        if self.config.spec is None:
            raise BadRequest("this service has no models spec (curation serve --spec): only embedding_input queries")
        key = (generation.manifest.clip_model, generation.manifest.clip_checkpoint)
        with self._encoder_lock:
            if self._encoder is None or self._encoder[0] != key:
                self._encoder = (key, QueryEncoder(self.config.spec, generation.manifest, self.config.device))
            return self._encoder[1]

    def gauges(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for modality, engine in self.engines.items():
            gen = engine.current()
            out[f"curation_index_generation_{modality}"] = gen.manifest.generation
            out[f"curation_index_vectors_{modality}"] = gen.manifest.vectors
            out[f"curation_index_reloads_total_{modality}"] = engine.reloads
            out[f"curation_index_reload_errors_total_{modality}"] = engine.reload_errors
            out[f"curation_taken_down_in_index_{modality}"] = len(gen.taken_down())
        out["curation_taken_down_uids"] = self.engines["image"].current().blocked_uids()
        return out

    # ------------------------------------------------------------------------------------------------ queries

    def knn(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """clip-retrieval's /knn-service: the query, the search with filters, post-processing, the results."""
        self._check_index_name(body)
        generation = self.engine(str(body.get("modality") or "image")).current()
        num_images = _int(body, "num_images", 40, 1, MAX_K)
        num_result_ids = max(num_images, _int(body, "num_result_ids", num_images, 1, MAX_K))
        query = self._query(body, generation)
        filters = _filters(body)
        ranked = generation.search(query, num_result_ids, filters)[0]
        if _flag(body, "deduplicate"):
            dropped = generation.near_duplicates([r for r, _ in ranked])
            ranked = [hit for i, hit in enumerate(ranked) if i not in dropped]
        out = [_result(h.uid, h.score, h.fields) for h in hits(generation, ranked[:num_images])]
        out += [{"id": int(generation.store.uids[r]), "similarity": s} for r, s in ranked[num_images:]]
        return out

    def _query(self, body: dict[str, Any], generation: Generation) -> np.ndarray:
        """The query vector from text, image, image_url or embedding_input (exactly one), aesthetic shift applied."""
        given = [k for k in ("text", "image", "image_url", "embedding_input") if body.get(k) not in (None, "")]
        if len(given) != 1:
            raise BadRequest(f"give exactly one of text, image, image_url, embedding_input (got {given or 'none'})")
        kind, value = given[0], body[given[0]]
        if kind == "embedding_input":
            query = _embedding(value, generation.manifest.dim)
        elif kind == "text":
            if not isinstance(value, str) or len(value) > 10_000:
                raise BadRequest("text must be a string of at most 10,000 characters")
            query = self.encoder(generation).texts([value])
        else:
            data = _base64(value, self.config.max_image_bytes) if kind == "image" else self._fetch(value)
            query = self.encoder(generation).images([self._decode_image(data)])
        score = body.get("aesthetic_score")
        if score not in (None, ""):
            weight = _number(body, "aesthetic_weight", 0.5)
            try:
                rating = int(score)
            except (TypeError, ValueError):
                raise BadRequest(f"aesthetic_score must be an integer rating 0-9, got {score!r}") from None
            query = generation.shift_by_aesthetic(query, rating, weight)
        return np.atleast_2d(query).astype(np.float32)

    def _fetch(self, url: Any) -> bytes:
        """image_url through the SSRF guard: policy, redirects, byte cap and deadline as for downloads."""
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise BadRequest("image_url must be an http(s) URL")
        opener = build_guarded_opener(self.config.url_policy, max_body_bytes=self.config.max_image_bytes,
                                      deadline_s=self.config.url_deadline_s)
        try:
            with opener.open(url, timeout=min(10.0, self.config.url_deadline_s)) as response:
                return bytes(response.read())
        except Exception as exc:  # urllib, the guard and the socket raise many types; each is this request's fault
            raise BadRequest(f"image_url could not be fetched: {exc}") from None

    def _decode_image(self, data: bytes) -> Image.Image:
        from curation.download import header_refusal

        refusal = header_refusal(_io.BytesIO(data), min_image_bytes=0, max_image_pixels=self.config.max_image_pixels,
                                 allowed_formats=())
        if refusal is not None:
            raise BadRequest(f"image refused: {refusal}")
        try:
            with Image.open(_io.BytesIO(data)) as img:
                return img.convert("RGB")
        except Exception as exc:  # PIL raises many types for bad bytes
            raise BadRequest(f"image could not be decoded: {type(exc).__name__}: {exc}") from None

    def metadata(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """clip-retrieval's /metadata: each id's fields (an empty object for an id the index does not hold, or that a
        takedown list took down)."""
        self._check_index_name(body)
        ids = body.get("ids")
        if not isinstance(ids, list) or len(ids) > MAX_K:
            raise BadRequest(f"ids must be a list of at most {MAX_K} ids")
        uids = [_uid(i) for i in ids]
        generation = self.engines["image"].current()
        positions = generation.store.positions(uids)
        positions[np.isin(positions, generation.taken_down().rows)] = -1
        found = generation.describe([int(p) for p in positions if p >= 0])
        by_uid = {int(f.pop(R.UID)): f for f in found}
        return [{"id": u, "metadata": _fields(u, by_uid[u]) if u in by_uid else {}} for u in uids]

    def _check_index_name(self, body: dict[str, Any]) -> None:
        name = body.get("indice_name")
        if name not in (None, "", self.config.name):
            raise BadRequest(f"no index named {name!r}; this service serves [{self.config.name!r}]")

    # ------------------------------------------------------------------------------------------------ subsets

    def save_subset(self, body: dict[str, Any]) -> Response:
        """POST /subsets: `query` (a /knn-service body: the query and its filters; paging and `deduplicate` do not
        apply) encoded once by the model that serves it, saved with `min_similarity` (a floor on the query's cosine)
        or `top_k` as the subset `name`, and its first release exported: 201 with the release and its diff."""
        unknown = sorted(set(body) - {"name", "description", "query", "min_similarity", "top_k"})
        if unknown:
            raise BadRequest(f"unknown fields {unknown}: give name, description, query, and min_similarity or top_k")
        name, description, query = body.get("name"), body.get("description") or "", body.get("query")
        if not isinstance(name, str) or not isinstance(description, str) or len(description) > 1_000:
            raise BadRequest("name must be a string, and description a string of at most 1,000 characters")
        if not isinstance(query, dict):
            raise BadRequest("query must be a /knn-service request body (a JSON object)")
        floor, top_k = _selection(body)
        self._check_index_name(query)
        modality = str(query.get("modality") or "image")
        generation = self.engine(modality).current()
        vector = self._query(query, generation)[0]
        saved = SavedQuery.from_vector(vector, generation.manifest, modality, _filters(query), min_similarity=floor,
                                       top_k=top_k, source=_provenance(query))
        with self._save_lock:
            r = save_subset(self.config.lake_root, SubsetDefinition.from_query(name, description, saved),
                            self.config.subsets_registry)
        return _json({"name": r.name, "release": r.release, "new_release": r.new_release, "rows": r.rows,
                      "digest": r.digest, "diff": {"added": r.added, "removed": r.removed,
                                                   "added_by_reason": r.added_by_reason,
                                                   "removed_by_reason": r.removed_by_reason},
                      "query": {k: v for k, v in saved.record().items() if k != "embedding"}}, 201)

    def subsets(self, _: Any = None) -> list[dict[str, Any]]:
        """GET /subsets: every registered subset (built-in, registry file, saved searches) with its latest release."""
        return subset_summaries(self.config.lake_root, self.config.subsets_registry)

    def explain(self, uid_text: str) -> dict[str, Any]:
        """GET /explain/{uid}: everything the lake knows about the sample (curation.explain): 404 for a uid the lake
        does not hold, 400 for one that is not an integer."""
        return explain(self.config.lake_root, _uid(uid_text), self.config.subsets_registry)

    # ------------------------------------------------------------------------------------------------- images

    def image(self, uid: int) -> tuple[bytes, str, str]:
        """(bytes, content type, original URL) of an indexed uid's image, read from its shard in the lake; 410 Gone
        naming the list for a uid a takedown list took down."""
        generation = self.engines["image"].current()
        taken_down_by = generation.taken_down_by(uid)
        if taken_down_by is not None:
            raise Gone(uid, taken_down_by)
        [position] = generation.store.positions([uid]).tolist()
        if position < 0:
            raise LookupError(f"uid {uid} is not in the index")
        row = generation.store.table.select([R.CRAWL, R.SEGMENT, R.SOURCE_SHARD, R.SOURCE_KEY, R.URL]).slice(
            position, 1).to_pylist()[0]
        shard = join(Lake(self.config.lake_root).shards_dir(Partition(row[R.CRAWL], row[R.SEGMENT])),
                     f"{row[R.SOURCE_SHARD]}.tar")
        member = self._members(shard).get(str(row[R.SOURCE_KEY]))
        if member is None:
            raise LookupError(f"uid {uid}'s image is not in its shard {shard}")
        ext, offset, size = member
        fs, path = filesystem(shard)
        with fs.open(path, "rb") as f:
            f.seek(offset)
            return f.read(size), _IMAGE_TYPES[ext], str(row[R.URL])

    def _members(self, shard: str) -> dict[str, tuple[str, int, int]]:
        """key -> (extension, data offset, size) of a shard's images, scanned once and cached (64 shards)."""
        with self._shards_lock:
            if shard in self._shards:
                self._shards.move_to_end(shard)
                return self._shards[shard]
        members: dict[str, tuple[str, int, int]] = {}
        fs, path = filesystem(shard)
        if fs.exists(path):
            with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for m in tar:
                    key, _, ext = m.name.rpartition(".")
                    if ext in R.IMAGE_EXTENSIONS and key not in members:
                        members[key] = (ext, m.offset_data, m.size)
        with self._shards_lock:
            self._shards[shard] = members
            while len(self._shards) > 64:
                self._shards.popitem(last=False)
        return members


# ---------------------------------------------------------------------------------------------- results


def _fields(uid: int, fields: dict[str, Any]) -> dict[str, Any]:
    """A hit's fields as the service names them: clip-retrieval's `similarity` is the query's score, so the stored
    image-caption similarity is `caption_similarity`; `uid` repeats clip-retrieval's `id`, and `uid_str` spells it
    as a string because a 64-bit uid does not survive JavaScript's JSON.parse (doubles hold 53 bits)."""
    out = {"uid": uid, "uid_str": str(uid), **fields}
    if R.SIMILARITY in out:
        out[CAPTION_SIMILARITY] = out.pop(R.SIMILARITY)
    return out


def _result(uid: int, score: float, fields: dict[str, Any]) -> dict[str, Any]:
    return {"id": uid, "similarity": score, **_fields(uid, fields)}


# ---------------------------------------------------------------------------------------------- request parsing


def _filters(body: dict[str, Any]) -> Filters:
    try:
        return Filters.from_request(body, safe=_flag(body, "use_safety_model"),
                                    no_nsfw_tag=_flag(body, "use_violence_detector"))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value in (None, ""):
        return False
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false")
    return value


def _int(body: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise BadRequest(f"{key} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key, default)
    if value in (None, ""):
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadRequest(f"{key} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise BadRequest(f"{key} must be finite")
    return number


def _embedding(value: Any, dim: int) -> np.ndarray:
    if not isinstance(value, list) or len(value) != dim:
        raise BadRequest(f"embedding_input must be a list of {dim} numbers")
    try:
        vector = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise BadRequest("embedding_input must hold numbers only") from None
    norm = float(np.linalg.norm(vector))
    if not math.isfinite(norm) or norm == 0:
        raise BadRequest("embedding_input must be a finite, non-zero vector")
    return vector / norm


def _selection(body: dict[str, Any]) -> tuple[float | None, int | None]:
    """A saved search's (min_similarity, top_k): exactly one given."""
    given = [k for k in ("min_similarity", "top_k") if body.get(k) not in (None, "")]
    if len(given) != 1:
        raise BadRequest(f"give exactly one of min_similarity (a cosine floor) and top_k (got {given or 'none'})")
    if given == ["top_k"]:
        return None, _int(body, "top_k", 1, 1, 2**31 - 1)
    floor = _number(body, "min_similarity", 0.0)
    if not -1.0 <= floor <= 1.0:
        raise BadRequest(f"min_similarity must be a cosine in [-1, 1], got {floor}")
    return floor, None


def _provenance(query: dict[str, Any]) -> dict[str, Any]:
    """What a saved search encoded, for its record: the text or URL, an upload's sha256, the aesthetic shift."""
    out = {k: query[k] for k in ("text", "image_url", "aesthetic_score", "aesthetic_weight")
           if query.get(k) not in (None, "")}
    if query.get("image") not in (None, ""):
        out["image_sha256"] = hashlib.sha256(base64.b64decode(query["image"])).hexdigest()
    if query.get("embedding_input") not in (None, ""):
        out["embedding_input"] = "given"
    return out


def _base64(value: Any, limit: int) -> bytes:
    if not isinstance(value, str) or len(value) > limit * 4 // 3 + 4:
        raise BadRequest(f"image must be a base64 string of at most {limit:,} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image is not valid base64") from None


def _uid(value: Any) -> int:
    """An id as clip-front sends it back: a number, or a string of one (json-bigint keeps int64 ids as strings)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise BadRequest(f"ids must be integers, got {value!r}")
    try:
        uid = int(value)
    except ValueError:
        raise BadRequest(f"ids must be integers, got {value!r}") from None
    if not -(2**63) <= uid < 2**63:
        raise BadRequest(f"id {uid} is out of range")
    return uid


# --------------------------------------------------------------------------------------------------- the app


def build_app(config: ServiceConfig) -> Starlette:
    """The ASGI app for `config` (the index must exist: FileNotFoundError with the fix otherwise)."""
    service = Service(config)
    routes = [
        Route("/health", _endpoint(service, "health", lambda _: _health(service)), methods=["GET"]),
        Route("/indices-list", _endpoint(service, "indices", lambda _: [config.name]), methods=["GET"]),
        Route("/knn-service", _endpoint(service, "knn", service.knn, source="body"), methods=["POST"]),
        Route("/metadata", _endpoint(service, "metadata", service.metadata, source="body"), methods=["POST"]),
        Route("/subsets", _endpoint(service, "subsets", service.subsets), methods=["GET"]),
        Route("/subsets", _endpoint(service, "save_subset", service.save_subset, source="body"), methods=["POST"]),
        Route("/export", _endpoint(service, "export", lambda body: _export_response(service, body), source="body"),
              methods=["POST"]),
        Route("/explain/{uid}", _endpoint(service, "explain", service.explain, source="uid"), methods=["GET"]),
        Route("/image/{uid}", _endpoint(service, "image", lambda uid: _image_response(service, uid), source="uid"),
              methods=["GET"]),
        Route("/metrics", _endpoint(service, "metrics", lambda _: PlainTextResponse(
            service.metrics.render(service.gauges()), media_type="text/plain; version=0.0.4")), methods=["GET"]),
        *explorer_routes(),  # the explorer's page at / and its two files (curation.explorer), without the token
    ]
    # clip-front is deployed on its own origin and calls the API from the browser, as it calls clip_back (which
    # allows every origin): the same here, for the API's simple GET/POST requests (no cookies are ever used).
    middleware = [Middleware(CORSMiddleware, allow_origins=list(config.cors_origins), allow_methods=["GET", "POST"],
                             allow_headers=["Authorization", "Content-Type"])]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.service = service
    return app


def _health(service: Service) -> dict[str, Any]:
    generation = service.engines["image"].current()
    gen = generation.manifest
    return {"status": "ok", "index": service.config.name, "generation": gen.generation, "vectors": gen.vectors,
            "taken_down": generation.blocked_uids()}


def _endpoint(service: Service, name: str, work: Callable[[Any], Any], *, source: str | None = None
              ) -> Callable[[Request], Awaitable[Response]]:
    """One route: auth, rate limit, its input (`source`: "body" for the JSON body, a path parameter's name, or
    None), the work in a thread, errors as JSON (400 refused, 404 not found, 500 internal), metrics."""

    async def handle(request: Request) -> Response:
        started = time.perf_counter()
        response = _refusal(service, request, name)
        if response is None:
            try:
                payload = (await _json_body(request, service.config.max_body_bytes) if source == "body"
                           else request.path_params[source] if source else None)
                result = await run_in_threadpool(work, payload)
                response = result if isinstance(result, Response) else _json(result)
            except BadRequest as exc:
                response = _json({"error": str(exc)}, exc.status)
            except Gone as exc:
                response = _json({"error": str(exc), "status": R.STATUS_TAKEN_DOWN, "list": exc.list_name}, 410)
            except ValueError as exc:  # the core's deliberate refusals of what the request asked for
                response = _json({"error": str(exc)}, 400)
            except LookupError as exc:
                response = _json({"error": str(exc).strip("'")}, 404)
            except Exception:  # an internal fault: logged with its traceback, answered without one
                log.exception("%s failed", name)
                response = _json({"error": "internal error; see the server's log"}, 500)
        service.metrics.observe(name, response.status_code, time.perf_counter() - started)
        return response

    return handle


def _export_response(service: Service, body: dict[str, Any]) -> Response:
    """/export: a /knn-service body plus `format` ("parquet" or "json"), answered with those results as an
    img2dataset input file (curation.export), as an attachment."""
    fmt = body.get("format")
    if fmt not in FORMATS:
        raise BadRequest(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    query = {k: v for k, v in body.items() if k not in ("format", "num_result_ids")}  # only rows with metadata
    exported = export_results(service.knn(query), fmt, stem=f"{service.config.name}-results")
    return Response(exported.data, media_type=exported.media_type, headers={
        "Content-Disposition": f'attachment; filename="{exported.filename}"', "X-Result-Rows": str(exported.rows)})


def _image_response(service: Service, uid_text: str) -> Response:
    data, media_type, url = service.image(_uid(uid_text))
    return Response(data, media_type=media_type,
                    headers={"X-Original-URL": url, "Cache-Control": "private, max-age=3600"})


def _refusal(service: Service, request: Request, name: str) -> Response | None:
    """401 without the right bearer token, 403 for a write from another web origin, 429 over the client's rate;
    None to go ahead."""
    if name in WRITE_ENDPOINTS and not _same_origin(request, service.config.cors_origins):
        return _json({"error": f"{request.url.path} writes into the lake and is refused from another web origin "
                               f"({request.headers.get('origin')}); list it in cors_origins to allow it"}, 403)
    token = service.config.token
    if token is not None and name != "health":
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _json({"error": "missing or wrong bearer token (Authorization: Bearer ...)"}, 401)
    if name != "health":
        client = request.client.host if request.client else "unknown"
        wait = service.limiter.wait_s(client)
        if wait > 0:
            return _json({"error": f"rate limit: {service.config.rate_per_s:g} requests/s per client"}, 429,
                         {"Retry-After": str(max(1, math.ceil(wait)))})
    return None


def _same_origin(request: Request, allowed: tuple[str, ...]) -> bool:
    """Whether a request comes from no browser page, this service's own page, or an explicitly allowed origin.
    Any web page the user opens can POST to a loopback service (a text/plain POST needs no CORS preflight), so a
    write must not rely on CORS, nor on the token, which is optional on loopback. `*` does not count here."""
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not sent by a browser page (curl, ClipClient, the CLI)
    if origin in allowed:
        return True
    return urllib.parse.urlsplit(origin).netloc == request.headers.get("host", "")


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"request body over {limit:,} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(f"request body over {limit:,} bytes", 413)
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks) or b"null")
    except (ValueError, RecursionError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    return data


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(data, ensure_ascii=False, allow_nan=False, default=_plain), status_code=status,
                    media_type="application/json", headers=headers)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def serve(config: ServiceConfig, host: str = "127.0.0.1", port: int = 1234) -> None:
    """Run the service under uvicorn until interrupted. Refuses an address other than loopback without a token."""
    import uvicorn

    if host not in LOOPBACK_HOSTS and config.token is None:
        raise ValueError(f"refusing to serve on {host} without a bearer token: set CURATION_SERVE_TOKEN (at least "
                         "16 characters), or bind to 127.0.0.1")
    uvicorn.run(build_app(config), host=host, port=port, log_level="warning", access_log=False)
