"""The sample web's models: the toy CLIP plus punsafe / pwatermark / aesthetic heads fitted on its truth.

`ensure_sample_models(sample_web_root, cache_dir)` trains (once per machine, cached by content) the toy
CLIP (`toy_clip.ensure_toy_clip`) and three heads on the toy CLIP's embeddings of the train split's
images, labelled from `truth.parquet`: unsafe = the "hazard" stand-in concept, watermark, aesthetic
score. It returns a *models spec* (see `scoring.ScoringConfig.from_spec`) and writes it as JSON next to
the checkpoints; held-out figures for every head are recorded in the spec's ``evaluation``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from curation.clip import LoadedClip
from curation.heads import HeadTrainConfig, load_head, train_head
from curation.io import file_sha256, write_json
from curation.models import SIDECAR_SUFFIX
from curation.safety import FLAG_THRESHOLDS
from curation.sample.toy_clip import (
    HAZARD_PROMPTS,
    IMAGE_BATCH,
    IMAGE_BEHAVIOURS,
    ToyClipTrainConfig,
    distinct_images,
    ensure_toy_clip,
    image_rows,
    load_cpu,
    open_rgb,
    sample_web_digest,
    truth_rows,
)
from curation.sample.web import COLOURS, SHAPES, UNSAFE_CONCEPT

log = logging.getLogger(__name__)

HEAD_CONFIGS: dict[str, HeadTrainConfig] = {
    "punsafe": HeadTrainConfig(kind="punsafe", epochs=150),
    "pwatermark": HeadTrainConfig(kind="pwatermark", epochs=1000, lr=5e-3),
    "aesthetic": HeadTrainConfig(kind="aesthetic", architecture="mlp_v2", epochs=100),
}
SPEC_VERSION = 1


def sample_prompt_sets() -> dict[str, list[str]]:
    """Zero-shot NSFW-tag prompt sets for the sample web: one neutral prompt per concept, and the hazard set."""
    neutral = [f"a drawing of a {c} {s}" for c in COLOURS for s in SHAPES]
    return {"neutral": neutral, UNSAFE_CONCEPT: list(HAZARD_PROMPTS)}


def _labels(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {
        "punsafe": np.array([r["concept"] == UNSAFE_CONCEPT for r in rows], dtype=np.float32),
        "pwatermark": np.array([bool(r["watermark"]) for r in rows], dtype=np.float32),
        "aesthetic": np.array([float(r["aesthetic"]) for r in rows], dtype=np.float32),
    }


def _embed(clip: LoadedClip, root: Path, rows: list[dict[str, Any]]) -> np.ndarray:
    return clip.encode_images([open_rgb(root / r["file"]) for r in rows], IMAGE_BATCH)


def _evaluate(kind: str, scores: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    if kind == "aesthetic":
        rho = spearmanr(scores, labels).statistic
        return {"heldout_spearman": round(float(rho), 4), "heldout_n": int(labels.size)}
    flag = scores > FLAG_THRESHOLDS[kind]
    pos = labels > 0.5
    return {
        "heldout_recall": round(float(flag[pos].mean()), 4) if pos.any() else None,
        "heldout_false_flag_rate": round(float(flag[~pos].mean()), 4) if (~pos).any() else None,
        "heldout_positives": int(pos.sum()),
        "heldout_n": int(labels.size),
    }


def _spec_key(clip_meta: dict[str, Any], sample_web_root: str) -> str:
    """Cache key of the heads and spec: the checkpoint, its calibrated thresholds, the web and the head configs."""
    clip = {k: clip_meta.get(k) for k in ("checkpoint_sha256", "threshold_en", "threshold_other")}
    payload = json.dumps({"clip": clip, "web": sample_web_digest(sample_web_root), "version": SPEC_VERSION,
                          "heads": {k: asdict(v) for k, v in HEAD_CONFIGS.items()}}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def train_sample_heads(sample_web_root: str, model_name: str, clip_path: str, out_dir: str, tag: str
                       ) -> tuple[dict[str, str], dict[str, Any]]:
    """Fit the three heads on a CLIP checkpoint's embeddings of the sample web's train-split images and
    evaluate them on the held-out split. Returns ({kind: checkpoint path}, {kind: figures})."""
    root = Path(sample_web_root)
    rows = truth_rows(sample_web_root)
    clip = load_cpu(model_name, clip_path)
    split_rows = {s: distinct_images(image_rows(rows, IMAGE_BEHAVIOURS, s)) for s in ("train", "heldout")}
    embeddings = {s: _embed(clip, root, rs) for s, rs in split_rows.items()}
    labels = {s: _labels(rs) for s, rs in split_rows.items()}
    heads: dict[str, str] = {}
    evaluation: dict[str, Any] = {}
    for kind, config in HEAD_CONFIGS.items():
        path = str(Path(out_dir) / f"{kind}-{tag}.pt")
        meta = train_head(embeddings["train"], labels["train"][kind], config, path, clip_model=model_name)
        head = load_head(path)
        evaluation[kind] = {"sha256": meta["sha256"], "architecture": meta["architecture"],
                            **_evaluate(kind, head.score(embeddings["heldout"]), labels["heldout"][kind])}
        heads[kind] = path
        log.info("sample models: %s head %s", kind, evaluation[kind])
    return heads, evaluation


def ensure_sample_models(sample_web_root: str, cache_dir: str, clip_config: ToyClipTrainConfig | None = None
                         ) -> dict[str, Any]:
    """The sample web's models spec, training the toy CLIP and the heads only when not cached.

    The spec is written to ``<cache_dir>/sample-models-<key>.json``; its head checkpoints sit beside it.
    """
    clip_path = ensure_toy_clip(sample_web_root, cache_dir, clip_config)
    clip_meta = json.loads(Path(clip_path + SIDECAR_SUFFIX).read_text())
    key = _spec_key(clip_meta, sample_web_root)
    spec_path = Path(cache_dir) / f"sample-models-{key}.json"
    if spec_path.is_file():
        spec: dict[str, Any] = json.loads(spec_path.read_text())
        heads_intact = all(Path(p).is_file() and file_sha256(p) == spec["evaluation"][k]["sha256"]
                           for k, p in spec["heads"].items())
        if spec.get("pretrained") == clip_path and heads_intact:
            log.info("sample models: using cached %s", spec_path)
            return spec
    heads, evaluation = train_sample_heads(sample_web_root, clip_meta["model_name"], clip_path, cache_dir, key)
    spec = {
        "model_name": clip_meta["model_name"],
        "pretrained": clip_path,
        "threshold_en": clip_meta["threshold_en"],
        "threshold_other": clip_meta["threshold_other"],
        "heads": heads,
        "nsfw_prompt_sets": sample_prompt_sets(),
        "unsafe_sets": [UNSAFE_CONCEPT],
        "evaluation": {"zero_shot": clip_meta["zero_shot"], **evaluation},
        "source": f"trained on the sample web {sample_web_root} (content digest {key})",
    }
    write_json(spec, str(spec_path))
    return spec
