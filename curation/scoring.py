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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation import records as R
from curation.clip import ClipPassConfig, ClipPassResult, LoadedClip, load_clip, run_clip_pass
from curation.heads import Head, load_head
from curation.io import filesystem, read_npy, remove, require_finished, write_marker, write_parquet
from curation.layout import IMG_EMB_FILE, TEXT_EMB_FILE, UIDS_FILE, Lake, Partition, join
from curation.models import SPEC_KEYS, checkpoint_identity, model_defaults
from curation.safety import DEFAULT_PROMPT_SETS, DEFAULT_UNSAFE_SETS, FLAG_THRESHOLDS, nsfw_tags


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
        unknown = sorted(set(kinds) - set(R.HEAD_KINDS))
        if unknown or len(kinds) != len(set(kinds)):
            raise ValueError(f"heads must name each of {R.HEAD_KINDS} at most once, got {kinds}")
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
        extra = sorted(set(spec) - SPEC_KEYS)
        if extra:
            raise ValueError(f"unknown models-spec keys {extra}; known: {sorted(SPEC_KEYS)}")
        if not spec.get("model_name"):
            raise ValueError("the models spec needs 'model_name' (an open_clip model name)")
        model_name = str(spec["model_name"])
        pretrained = spec.get("pretrained")
        thresholds = {k: spec.get(k) for k in ("threshold_en", "threshold_other")}
        if any(v is None for v in thresholds.values()):
            if pretrained is None:
                raise ValueError("a randomly initialised model has no keep thresholds: set threshold_en and "
                                 "threshold_other in the models spec")
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


def _read_inputs(lake: Lake, part: Partition) -> tuple[pa.Table, pa.Table]:
    """Unmark the partition's `clip` output and read its finished (pairs, downloads) tables."""
    remove(lake.marker("clip", part))  # not complete until the marker is rewritten
    for stage in ("pairs", "downloads"):  # a rerun upstream in progress, or killed, is not read
        require_finished(lake.partition_dir(stage, part), f"{stage} of {part.key}")
    return _read_table(lake.table("pairs", part), "pairs"), _read_table(lake.table("downloads", part), "downloads")


def _load_model(config: ClipPassConfig) -> LoadedClip:
    """The CLIP model of `config`; a load failure is re-raised as a RuntimeError saying how to fix it."""
    try:
        return load_clip(config)
    except (RuntimeError, OSError, ValueError) as exc:
        raise RuntimeError(
            f"cannot load CLIP {config.model_name!r} with pretrained={config.pretrained!r}: {exc}. "
            "Point the models spec's 'pretrained' at a local checkpoint file, or fill the Hugging Face hub cache "
            "on this node (the sample web's spec comes from `curation train-toy-clip --spec-out`)") from exc


class _Scores(NamedTuple):
    """Tags and head scores of the stored image embeddings; `row_of` maps a uid to its row in them."""

    row_of: dict[int, int]
    tags: list[str]
    scores: dict[str, np.ndarray]  # head kind -> one score per row


def _score_embeddings(emb_dir: str, clip_table: pa.Table, model: LoadedClip, heads: Mapping[str, Head],
                      config: ScoringConfig) -> _Scores:
    """Embeddings stored in emb_dir -> NSFW tags and head scores; raises if they are not the table's ok rows."""
    img_emb = read_npy(join(emb_dir, IMG_EMB_FILE)).astype(np.float32)
    npy_uids = read_npy(join(emb_dir, UIDS_FILE))
    row_of = {int(u): i for i, u in enumerate(npy_uids.tolist())}
    ok = [int(u) for u, s in zip(clip_table.column(R.UID).to_pylist(), clip_table.column(R.STATUS).to_pylist(),
                                 strict=True) if s == R.STATUS_OK]
    if sorted(ok) != sorted(row_of) or len(npy_uids) != len(img_emb):
        raise RuntimeError(f"embeddings in {emb_dir} do not match the pass's ok rows")
    prompt_sets = {name: list(prompts) for name, prompts in config.prompt_sets}
    tags = (nsfw_tags(img_emb, prompt_sets, model.model, model.tokenizer, unsafe_sets=config.unsafe_sets)
            if len(img_emb) else [])
    scores = {kind: head.score(img_emb) if len(img_emb) else np.zeros(0, np.float32) for kind, head in heads.items()}
    return _Scores(row_of, tags, scores)


def _with_score_columns(clip_table: pa.Table, scored: _Scores, heads: Mapping[str, Head], model_name: str,
                        identity: str) -> pa.Table:
    """The pass's table + nsfw_tag, one column per head kind, model name, checkpoint identity and head hashes."""
    uids = clip_table.column(R.UID).to_pylist()
    rows = [scored.row_of.get(int(u)) for u in uids]
    n = len(uids)
    columns: dict[str, pa.Array] = {
        R.NSFW_TAG: pa.array([scored.tags[i] if i is not None else None for i in rows], pa.string()),
    }
    for kind in R.HEAD_KINDS:
        values = scored.scores.get(kind)
        columns[kind] = pa.array([float(values[i]) if values is not None and i is not None else None for i in rows],
                                 pa.float32())
    columns[R.CLIP_MODEL] = pa.array([model_name] * n, pa.string())
    columns[R.CLIP_CHECKPOINT] = pa.array([identity] * n, pa.string())
    for kind, column in R.HEAD_COLUMNS.items():
        sha = heads[kind].sha256 if kind in heads else None
        columns[column] = pa.array([sha] * n, pa.string())
    table = clip_table
    for name, values in columns.items():
        table = table.append_column(name, values)
    return table


def _summarise(scored: _Scores) -> tuple[dict[str, int], dict[str, int]]:
    """Scores -> (images per NSFW tag, images over the punsafe / pwatermark flag thresholds)."""
    counts_by_tag: dict[str, int] = {}
    for t in scored.tags:
        counts_by_tag[t] = counts_by_tag.get(t, 0) + 1
    flagged = {}
    if "punsafe" in scored.scores:
        flagged["punsafe"] = int((scored.scores["punsafe"] > FLAG_THRESHOLDS["punsafe"]).sum())
    if "pwatermark" in scored.scores:
        flagged["pwatermark"] = int((scored.scores["pwatermark"] > FLAG_THRESHOLDS["pwatermark"]).sum())
    return counts_by_tag, flagged


def score_partition(lake_root: str, part: Partition, config: ScoringConfig) -> ScoreResult:
    """Run the CLIP pass for one partition and write its `clip` table and embeddings (marker last).

    Rows: one per pair, in pairs order, with the `clip_pass` columns plus ``nsfw_tag``, ``punsafe``,
    ``pwatermark``, ``aesthetic`` (null where the image was not embedded or no head is configured), the
    model name, checkpoint identity and head hashes. Raises on systemic faults only (missing upstream
    tables, shards that disagree with downloads, a head of the wrong dimension).
    """
    started = time.perf_counter()
    lake = Lake(lake_root)
    pairs, downloads = _read_inputs(lake, part)
    model = _load_model(config.clip)
    heads = _load_heads(config, model.embed_dim)
    result = run_clip_pass(lake.shards_dir(part), pairs, downloads, lake.embeddings_dir(part), config.clip, clip=model)

    # Tags and heads score the embeddings as stored (float16, read back), not the pass's float32 arrays: the
    # lake's scores are then exactly what anyone recomputes from its files, and the read checks alignment.
    scored = _score_embeddings(lake.embeddings_dir(part), result.table, model, heads, config)
    identity = checkpoint_identity(config.clip.pretrained)
    table = _with_score_columns(result.table, scored, heads, config.clip.model_name, identity)
    table_path = lake.table("clip", part)
    write_parquet(table, table_path)
    counts_by_tag, flagged = _summarise(scored)
    total = time.perf_counter() - started
    write_marker(lake.partition_dir("clip", part), {
        "rows": table.num_rows,
        "embedded": result.n_embedded,
        "kept": result.n_kept,
        "by_status": result.counts_by_status,
        "by_reason": result.counts_by_reason,
        "by_nsfw_tag": counts_by_tag,
        "flagged": flagged,
        R.CLIP_MODEL: config.clip.model_name,
        R.CLIP_CHECKPOINT: identity,
        "heads": {kind: head.sha256 for kind, head in heads.items()},
        "device": result.device,
        "precision": result.precision,
    })
    return ScoreResult(table=table, clip_pass=result, clip_model=config.clip.model_name, clip_checkpoint=identity,
                       head_sha256={k: h.sha256 for k, h in heads.items()}, counts_by_tag=counts_by_tag,
                       n_flagged=flagged, table_path=table_path, seconds_total=total)


def verify_clip_partition(lake_root: str, part: Partition) -> list[str]:
    """Re-read a written `clip` partition and list what is inconsistent (empty when sound).

    Checks: the table's ok rows and ``uids.npy`` name the same uids in the same order (besides rows a takedown
    emptied, whose embeddings are zero); both embedding files have one L2-normalised row per other uid; every
    ok row has a similarity and a tag, and a score for every head the table says was used; no other row has any.
    """
    lake = Lake(lake_root)
    problems: list[str] = []
    table = _read_table(lake.table("clip", part), "clip")
    emb_dir = lake.embeddings_dir(part)
    uids = read_npy(join(emb_dir, UIDS_FILE))
    status = table.column(R.STATUS).to_pylist()
    all_uids = table.column(R.UID).to_pylist()
    ok_uids = [u for u, s in zip(all_uids, status, strict=True) if s == R.STATUS_OK]
    gone = {u for u, s in zip(all_uids, status, strict=True) if s == R.STATUS_TAKEN_DOWN}
    zeroed = np.isin(uids, np.fromiter(gone, np.int64, len(gone))) if gone else np.zeros(len(uids), bool)
    if ok_uids != uids[~zeroed].tolist():
        problems.append(f"uids.npy ({len(uids)}) differs from the table's {len(ok_uids)} ok rows")
    for name in (IMG_EMB_FILE, TEXT_EMB_FILE):
        emb = read_npy(join(emb_dir, name)).astype(np.float32)
        if emb.shape[0] != len(uids):
            problems.append(f"{name} has {emb.shape[0]} rows for {len(uids)} uids")
            continue
        if np.any(emb[zeroed]):
            problems.append(f"{name} still holds embeddings of taken-down rows")
        emb = emb[~zeroed]
        if len(emb):
            norms = np.linalg.norm(emb, axis=1)
            if np.abs(norms - 1).max() > 1e-2:
                problems.append(f"{name} rows are not L2-normalised (norms {norms.min():.3f}..{norms.max():.3f})")
    is_ok = np.array([s == R.STATUS_OK for s in status], dtype=bool)
    used = [kind for kind, col in R.HEAD_COLUMNS.items() if table.column(col).null_count < table.num_rows]
    for column in (R.SIMILARITY, R.NSFW_TAG, *used):
        present = ~np.array(table.column(column).is_null().to_pylist(), dtype=bool)
        if (present != is_ok).any():
            problems.append(f"{column} is set on {int(present.sum())} rows, expected exactly the {int(is_ok.sum())} "
                            "ok rows")
    return problems
