"""Score a lake partition in one CLIP pass: similarity filter, zero-shot safety tag, heads, embeddings.

`score_partition(lake_root, partition, ScoringConfig)` reads the partition's `pairs` and `downloads`
tables, runs `clip.run_clip_pass` (embeddings into the partition's ``embeddings/`` folder), scores the
image embeddings with the configured heads (`punsafe`, `pwatermark`, `aesthetic`) and the zero-shot
NSFW prompt sets, and writes the `clip` table plus its success marker last. Every score row records the
CLIP model, its checkpoint identity and each head's sha256.

A `ScoringConfig` is usually built from a *models spec* (`ScoringConfig.from_spec`): a JSON-able dict
naming the open_clip model and checkpoint, keep thresholds, head checkpoints and prompt sets. The sample
web's spec is written by `curation train-toy-clip`; a real deployment writes its own.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation import records as R
from curation.clip import (
    DEFAULT_PROMPT_SETS,
    DEFAULT_UNSAFE_SETS,
    ClipPassConfig,
    ClipPassResult,
    load_clip,
    nsfw_tags,
    run_clip_pass,
)
from curation.heads import KINDS, Head, load_head
from curation.io import file_sha256, filesystem, read_npy, remove, require_finished, write_marker, write_parquet
from curation.layout import IMG_EMB_FILE, TEXT_EMB_FILE, UIDS_FILE, Lake, Partition, join
from curation.toyclip import model_defaults, register_model_configs

NSFW_TAG = "nsfw_tag"
CLIP_MODEL = "clip_model"
CLIP_CHECKPOINT = "clip_checkpoint"
HEAD_COLUMNS = {kind: f"{kind}_head" for kind in KINDS}  # kind -> column holding that head's sha256

SCORE_COLUMNS = (NSFW_TAG, *KINDS, CLIP_MODEL, CLIP_CHECKPOINT, *HEAD_COLUMNS.values())
# Flag thresholds LAION's subsets use; the table keeps the raw probabilities, these only feed the summary.
PUNSAFE_FLAG = 0.5
PWATERMARK_FLAG = 0.8


@dataclass(frozen=True)
class ScoringConfig:
    """The CLIP pass config plus what is scored from its embeddings. Frozen and validated."""

    clip: ClipPassConfig
    heads: tuple[tuple[str, str], ...] = ()  # (kind, checkpoint path); a kind left out scores null
    prompt_sets: tuple[tuple[str, tuple[str, ...]], ...] = tuple(DEFAULT_PROMPT_SETS.items())
    unsafe_sets: tuple[str, ...] = DEFAULT_UNSAFE_SETS
    spec: Mapping[str, Any] = field(default_factory=dict, compare=False)  # the spec it came from, for the record

    def __post_init__(self) -> None:
        kinds = [k for k, _ in self.heads]
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown or len(kinds) != len(set(kinds)):
            raise ValueError(f"heads must name each of {KINDS} at most once, got {kinds}")
        names = [n for n, _ in self.prompt_sets]
        if any(n not in names for n in self.unsafe_sets):
            raise ValueError(f"unsafe_sets {list(self.unsafe_sets)} must be among the prompt sets {names}")
        if not self.unsafe_sets or all(n in self.unsafe_sets for n in names):
            raise ValueError("need at least one unsafe and one safe prompt set")

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], **clip_overrides: Any) -> ScoringConfig:
        """Build from a models spec: ``model_name``, ``pretrained`` (tag, file or null for random init),
        optional ``threshold_en``/``threshold_other`` (default: the model's recorded defaults), ``heads``
        ({kind: path}), ``nsfw_prompt_sets`` ({label: [prompts]}) and ``unsafe_sets``. `clip_overrides`
        set other `ClipPassConfig` fields (device, batch_size, precision, num_workers...)."""
        known = {"model_name", "pretrained", "threshold_en", "threshold_other", "heads", "nsfw_prompt_sets",
                 "unsafe_sets", "evaluation", "source"}
        extra = sorted(set(spec) - known)
        if extra:
            raise ValueError(f"unknown models-spec keys {extra}; known: {sorted(known)}")
        if not spec.get("model_name"):
            raise ValueError("the models spec needs 'model_name' (an open_clip model name)")
        model_name = str(spec["model_name"])
        pretrained = spec.get("pretrained")
        thresholds = {k: spec.get(k) for k in ("threshold_en", "threshold_other")}
        if any(v is None for v in thresholds.values()):
            if pretrained is None:
                raise ValueError("a randomly initialised model has no keep thresholds: set threshold_en and "
                                 "threshold_other in the models spec")
            register_model_configs()
            defaults = model_defaults(model_name, str(pretrained))
            thresholds = {k: defaults[k] if v is None else v for k, v in thresholds.items()}
        clip = ClipPassConfig(model_name=model_name, pretrained=pretrained,
                              threshold_en=float(thresholds["threshold_en"]),  # type: ignore[arg-type]
                              threshold_other=float(thresholds["threshold_other"]),  # type: ignore[arg-type]
                              **clip_overrides)
        heads = tuple(sorted((str(k), str(v)) for k, v in (spec.get("heads") or {}).items()))
        for kind, path in heads:
            if not Path(path).is_file():
                raise FileNotFoundError(f"{kind} head checkpoint {path} does not exist (models spec 'heads')")
        sets = spec.get("nsfw_prompt_sets")
        prompt_sets = (tuple((str(k), tuple(str(p) for p in v)) for k, v in sets.items()) if sets
                       else tuple(DEFAULT_PROMPT_SETS.items()))
        unsafe = tuple(spec.get("unsafe_sets") or DEFAULT_UNSAFE_SETS)
        return cls(clip=clip, heads=heads, prompt_sets=prompt_sets, unsafe_sets=unsafe, spec=dict(spec))

    def with_clip(self, **overrides: Any) -> ScoringConfig:
        """A copy with some `ClipPassConfig` fields replaced."""
        return replace(self, clip=replace(self.clip, **overrides))


@dataclass(frozen=True)
class ScoreResult:
    """What `score_partition` wrote and measured."""

    table: pa.Table
    clip_pass: ClipPassResult
    clip_model: str
    clip_checkpoint: str
    head_sha256: dict[str, str]
    counts_by_tag: dict[str, int]
    n_flagged: dict[str, int]  # punsafe > 0.5, pwatermark > 0.8 among embedded images
    table_path: str
    seconds_total: float


@lru_cache(maxsize=16)
def _file_identity(path: str, size: int, mtime_ns: int) -> str:
    return "sha256:" + file_sha256(path)


def checkpoint_identity(pretrained: str | None) -> str:
    """How a score row names its weights: ``sha256:<hex>`` of a checkpoint file, the pretrained tag for a
    hub/cache tag (e.g. ``openai``), or ``random-init``. Hashes are cached per (path, size, mtime)."""
    if pretrained is None:
        return "random-init"
    p = Path(pretrained)
    if p.is_file():
        st = p.stat()
        return _file_identity(str(p.resolve()), st.st_size, st.st_mtime_ns)
    return pretrained


def _load_heads(config: ScoringConfig, embed_dim: int) -> dict[str, Head]:
    heads = {}
    for kind, path in config.heads:
        head = load_head(path)
        if head.kind != kind:
            raise ValueError(f"{path} is a {head.kind} head, configured as {kind}")
        if head.dim != embed_dim:
            raise ValueError(f"{kind} head {path} takes {head.dim}-d embeddings but {config.clip.model_name} "
                             f"gives {embed_dim}-d: train the head on this model's embeddings (curation train-head)")
        heads[kind] = head
    return heads


def _read_table(path: str, what: str) -> pa.Table:
    fs, p = filesystem(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"{what} table {path} is missing: materialize {what} for this partition first")
    return pq.read_table(p, filesystem=fs)


def score_partition(lake_root: str, part: Partition, config: ScoringConfig) -> ScoreResult:
    """Run the CLIP pass for one partition and write its `clip` table and embeddings (marker last).

    Rows: one per pair, in pairs order, with the `clip_pass` columns plus ``nsfw_tag``, ``punsafe``,
    ``pwatermark``, ``aesthetic`` (null where the image was not embedded or no head is configured), the
    model name, checkpoint identity and head hashes. Raises on systemic faults only (missing upstream
    tables, shards that disagree with downloads, a head of the wrong dimension).
    """
    started = time.perf_counter()
    lake = Lake(lake_root)
    out_dir = lake.partition_dir("clip", part)
    remove(lake.marker("clip", part))  # not complete until the marker is rewritten
    for stage in ("pairs", "downloads"):  # a rerun upstream in progress, or killed, is not read
        require_finished(lake.partition_dir(stage, part), f"{stage} of {part.key}")
    pairs = _read_table(lake.table("pairs", part), "pairs")
    downloads = _read_table(lake.table("downloads", part), "downloads")
    register_model_configs()
    try:
        model = load_clip(config.clip)
    except (RuntimeError, OSError, ValueError) as exc:
        raise RuntimeError(
            f"cannot load CLIP {config.clip.model_name!r} with pretrained={config.clip.pretrained!r}: {exc}. "
            "Point the models spec's 'pretrained' at a local checkpoint file, or fill the Hugging Face hub cache "
            "on this node (the sample web's spec comes from `curation train-toy-clip --spec-out`)") from exc
    heads = _load_heads(config, model.embed_dim)
    result = run_clip_pass(lake.shards_dir(part), pairs, downloads, lake.embeddings_dir(part), config.clip, clip=model)

    # Tags and heads score the embeddings as stored (float16, read back), not the pass's float32 arrays: the
    # lake's scores are then exactly what anyone recomputes from its files, and the read checks alignment.
    img_emb = read_npy(join(lake.embeddings_dir(part), IMG_EMB_FILE)).astype(np.float32)
    npy_uids = read_npy(join(lake.embeddings_dir(part), UIDS_FILE))
    row_of = {int(u): i for i, u in enumerate(npy_uids.tolist())}
    ok = [int(u) for u, s in zip(result.table.column(R.UID).to_pylist(), result.table.column(R.STATUS).to_pylist(),
                                 strict=True) if s == R.STATUS_OK]
    if sorted(ok) != sorted(row_of) or len(npy_uids) != len(img_emb):
        raise RuntimeError(f"embeddings in {lake.embeddings_dir(part)} do not match the pass's ok rows")
    prompt_sets = {name: list(prompts) for name, prompts in config.prompt_sets}
    tags = (nsfw_tags(img_emb, prompt_sets, model.model, model.tokenizer, unsafe_sets=config.unsafe_sets)
            if len(img_emb) else [])
    scores = {kind: head.score(img_emb) if len(img_emb) else np.zeros(0, np.float32) for kind, head in heads.items()}

    uids = result.table.column(R.UID).to_pylist()
    rows = [row_of.get(int(u)) for u in uids]
    identity = checkpoint_identity(config.clip.pretrained)
    n = len(uids)
    columns: dict[str, pa.Array] = {
        NSFW_TAG: pa.array([tags[i] if i is not None else None for i in rows], pa.string()),
    }
    for kind in KINDS:
        values = scores.get(kind)
        columns[kind] = pa.array([float(values[i]) if values is not None and i is not None else None for i in rows],
                                 pa.float32())
    columns[CLIP_MODEL] = pa.array([config.clip.model_name] * n, pa.string())
    columns[CLIP_CHECKPOINT] = pa.array([identity] * n, pa.string())
    for kind, column in HEAD_COLUMNS.items():
        sha = heads[kind].sha256 if kind in heads else None
        columns[column] = pa.array([sha] * n, pa.string())
    table = result.table
    for name, values in columns.items():
        table = table.append_column(name, values)

    table_path = lake.table("clip", part)
    write_parquet(table, table_path)
    counts_by_tag: dict[str, int] = {}
    for t in tags:
        counts_by_tag[t] = counts_by_tag.get(t, 0) + 1
    flagged = {}
    if "punsafe" in scores:
        flagged["punsafe"] = int((scores["punsafe"] > PUNSAFE_FLAG).sum())
    if "pwatermark" in scores:
        flagged["pwatermark"] = int((scores["pwatermark"] > PWATERMARK_FLAG).sum())
    total = time.perf_counter() - started
    write_marker(out_dir, {
        "rows": n,
        "embedded": result.n_embedded,
        "kept": result.n_kept,
        "by_status": result.counts_by_status,
        "by_reason": result.counts_by_reason,
        "by_nsfw_tag": counts_by_tag,
        "flagged": flagged,
        CLIP_MODEL: config.clip.model_name,
        CLIP_CHECKPOINT: identity,
        "heads": {kind: head.sha256 for kind, head in heads.items()},
        "device": result.device,
        "precision": result.precision,
    })
    return ScoreResult(table=table, clip_pass=result, clip_model=config.clip.model_name, clip_checkpoint=identity,
                       head_sha256={k: h.sha256 for k, h in heads.items()}, counts_by_tag=counts_by_tag,
                       n_flagged=flagged, table_path=table_path, seconds_total=total)


def verify_clip_partition(lake_root: str, part: Partition) -> list[str]:
    """Re-read a written `clip` partition and list what is inconsistent (empty when sound).

    Checks: the table's ok rows and ``uids.npy`` name the same uids in the same order; both embedding
    files have one L2-normalised row per uid; every ok row has a similarity and a tag, and a score for
    every head the table says was used; no other row has any.
    """
    lake = Lake(lake_root)
    problems: list[str] = []
    table = _read_table(lake.table("clip", part), "clip")
    emb_dir = lake.embeddings_dir(part)
    uids = read_npy(join(emb_dir, UIDS_FILE))
    status = table.column(R.STATUS).to_pylist()
    ok_uids = [u for u, s in zip(table.column(R.UID).to_pylist(), status, strict=True) if s == R.STATUS_OK]
    if ok_uids != uids.tolist():
        problems.append(f"uids.npy ({len(uids)}) differs from the table's {len(ok_uids)} ok rows")
    for name in (IMG_EMB_FILE, TEXT_EMB_FILE):
        emb = read_npy(join(emb_dir, name)).astype(np.float32)
        if emb.shape[0] != len(uids):
            problems.append(f"{name} has {emb.shape[0]} rows for {len(uids)} uids")
        elif len(emb):
            norms = np.linalg.norm(emb, axis=1)
            if np.abs(norms - 1).max() > 1e-2:
                problems.append(f"{name} rows are not L2-normalised (norms {norms.min():.3f}..{norms.max():.3f})")
    is_ok = np.array([s == R.STATUS_OK for s in status], dtype=bool)
    used = [kind for kind, col in HEAD_COLUMNS.items() if table.column(col).null_count < table.num_rows]
    for column in (R.SIMILARITY, NSFW_TAG, *used):
        present = ~np.array(table.column(column).is_null().to_pylist(), dtype=bool)
        if (present != is_ok).any():
            problems.append(f"{column} is set on {int(present.sum())} rows, expected exactly the {int(is_ok.sum())} "
                            "ok rows")
    return problems


def report_metadata(result: ScoreResult, config: ScoringConfig) -> dict[str, dict[str, Any]]:
    """Materialization metadata for a scored partition in Dagster Pipes' form ({name: {raw_value, type}}):
    counts, speed, model identity, the keep funnel and similarity / score histograms as inline PNGs."""
    from curation import plots

    p = result.clip_pass
    t = result.table
    ok = np.array([s == R.STATUS_OK for s in t.column(R.STATUS).to_pylist()], dtype=bool)

    def values(column: str) -> np.ndarray:
        return np.array([v for v, o in zip(t.column(column).to_pylist(), ok, strict=True) if o and v is not None],
                        dtype=np.float64)

    downloaded = t.num_rows - p.counts_by_status.get(R.STATUS_NOT_DOWNLOADED, 0)
    funnel = [("pairs", t.num_rows), ("downloaded", downloaded), ("embedded", p.n_embedded), ("kept", p.n_kept)]
    charts = [
        plots.markdown_image(plots.funnel_png(funnel, title="keep funnel"), "keep funnel"),
        plots.markdown_image(plots.histogram_png(
            values(R.SIMILARITY), title="image-caption cosine similarity", value_range=(-0.5, 1.0),
            markers=[("en", config.clip.threshold_en), ("other", config.clip.threshold_other)]), "similarity"),
    ]
    ranges = {"punsafe": (0.0, 1.0), "pwatermark": (0.0, 1.0), "aesthetic": (0.0, 10.0)}
    marks = {"punsafe": [("flag", PUNSAFE_FLAG)], "pwatermark": [("flag", PWATERMARK_FLAG)], "aesthetic": []}
    for kind in result.head_sha256:
        charts.append(plots.markdown_image(plots.histogram_png(values(kind), title=kind, value_range=ranges[kind],
                                                               markers=marks[kind]), kind))
    return {
        "dagster/row_count": {"raw_value": t.num_rows, "type": "int"},
        "dagster/uri": {"raw_value": result.table_path, "type": "path"},
        "embedded": {"raw_value": p.n_embedded, "type": "int"},
        "kept": {"raw_value": p.n_kept, "type": "int"},
        "keep_rate": {"raw_value": round(p.n_kept / p.n_embedded, 4) if p.n_embedded else 0.0, "type": "float"},
        "images_per_s": {"raw_value": round(p.images_per_s, 1), "type": "float"},
        "duration_s": {"raw_value": round(result.seconds_total, 1), "type": "float"},
        "device": {"raw_value": f"{p.device} ({p.precision})", "type": "text"},
        CLIP_MODEL: {"raw_value": result.clip_model, "type": "text"},
        CLIP_CHECKPOINT: {"raw_value": result.clip_checkpoint, "type": "text"},
        "heads": {"raw_value": dict(result.head_sha256), "type": "json"},
        "thresholds": {"raw_value": {"en": config.clip.threshold_en, "other": config.clip.threshold_other},
                       "type": "json"},
        "by_status": {"raw_value": plots.counts_markdown(p.counts_by_status, "status"), "type": "md"},
        "by_reason": {"raw_value": plots.counts_markdown(p.counts_by_reason, "reason"), "type": "md"},
        "by_nsfw_tag": {"raw_value": plots.counts_markdown(result.counts_by_tag, NSFW_TAG), "type": "md"},
        "flagged": {"raw_value": dict(result.n_flagged), "type": "json"},
        "charts": {"raw_value": "\n\n".join(charts), "type": "md"},
        "embeddings": {"raw_value": result.clip_pass.files.get("img_emb", ""), "type": "path"},
    }
