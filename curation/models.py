"""The CLIP model registry: architecture configs shipped with the package, published keep thresholds, checkpoint
sidecars, the keys of a models spec, and how a score row names its weights.

Light on purpose: open_clip and torch are imported only inside the functions that need them, so settings can
validate a models spec and the search service can name its model without loading either.

A *models spec* is a JSON-able dict: ``model_name`` (an open_clip name), ``pretrained`` (a tag such as
``openai``, a checkpoint file, ``local-dir:<dir>`` or null for a random init), optional ``threshold_en`` /
``threshold_other`` (default: `model_defaults`), ``heads`` ({kind: checkpoint}), ``nsfw_prompt_sets``
({label: [prompts]}), ``unsafe_sets``, and the informational ``evaluation`` and ``source``.
`curation.scoring.ScoringConfig.from_spec` turns one into the CLIP pass's configuration.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from curation.io import file_sha256

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
SIDECAR_SUFFIX = ".json"  # a checkpoint file's facts: `<checkpoint>.json`
SPEC_KEYS = frozenset({"model_name", "pretrained", "threshold_en", "threshold_other", "heads", "nsfw_prompt_sets",
                       "unsafe_sets", "evaluation", "source"})

# Published pair-filter thresholds per (model, pretrained tag), keyed "model/tag" (see `defaults_key`).
# Only LAION-5B's ViT-B/32 numbers are documented (chosen by human inspection); other seed models carry
# None and must be calibrated before they filter anything.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "ViT-B-32/openai": {
        "threshold_en": 0.28,
        "threshold_other": 0.26,
        "embed_dim": 512,
        "image_size": 224,
        "source": "LAION-5B: B/32 >= 0.28 (en), mCLIP >= 0.26 (multi/nolang); LAION-400M used 0.30",
    },
    "ViT-L-14/openai": {
        "threshold_en": None,
        "threshold_other": None,
        "embed_dim": 768,
        "image_size": 224,
        "source": "LAION's embedding/NSFW/aesthetic backbone; no published pair-filter threshold",
    },
    "ViT-B-32-256/datacomp_s34b_b86k": {
        "threshold_en": None,
        "threshold_other": None,
        "embed_dim": 512,
        "image_size": 256,
        "source": "no published pair-filter threshold",
    },
    "ViT-H-14/laion2b_s32b_b79k": {
        "threshold_en": None,
        "threshold_other": None,
        "embed_dim": 1024,
        "image_size": 224,
        "source": "H-14 index backbone; no published pair-filter threshold",
    },
    "xlm-roberta-large-ViT-H-14/frozen_laion5b_s13b_b90k": {
        "threshold_en": None,
        "threshold_other": None,
        "embed_dim": 1024,
        "image_size": 224,
        "source": "multilingual text tower; no published pair-filter threshold",
    },
}


def register_model_configs() -> list[str]:
    """Register the architecture configs in ``curation/model_configs/`` with open_clip; returns their names.

    Idempotent: a config already registered with identical content is not added again (open_clip's
    `add_model_config` appends to a search path and rescans every time it is called).
    """
    import open_clip

    names = []
    for path in sorted(MODEL_CONFIG_DIR.glob("*.json")):
        cfg = json.loads(path.read_text())
        if path.stem not in open_clip.list_models() or open_clip.get_model_config(path.stem) != cfg:
            open_clip.add_model_config(path)
        names.append(path.stem)
    return names


def model_config(model_name: str) -> dict[str, Any]:
    """The open_clip architecture config of a registered model name (raises KeyError when unknown)."""
    import open_clip

    register_model_configs()
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise KeyError(f"unknown open_clip model {model_name!r}; known: {open_clip.list_models()}")
    return dict(cfg)


def defaults_key(model_name: str, pretrained: str) -> str:
    """The `MODEL_DEFAULTS` key of a (model, pretrained tag) pair."""
    return f"{model_name}/{pretrained}"


def model_defaults(model_name: str, pretrained: str) -> dict[str, Any]:
    """Keep thresholds (and facts) of a model: its checkpoint sidecar when `pretrained` is a file with one
    (e.g. the sample web's toy CLIP), else `MODEL_DEFAULTS`. Raises KeyError when neither knows the model or
    a threshold."""
    sidecar = Path(pretrained + SIDECAR_SUFFIX)
    if Path(pretrained).is_file() and sidecar.is_file():
        meta = json.loads(sidecar.read_text())
        if meta.get("threshold_en") is None or meta.get("threshold_other") is None:
            raise KeyError(f"{sidecar} has no calibrated thresholds (trained with evaluate=False)")
        return {
            "threshold_en": meta["threshold_en"],
            "threshold_other": meta["threshold_other"],
            "embed_dim": meta["model_config"]["embed_dim"],
            "image_size": meta["model_config"]["vision_cfg"]["image_size"],
            "source": f"calibrated on the sample web ({sidecar.name})",
        }
    key = defaults_key(model_name, pretrained)
    entry = MODEL_DEFAULTS.get(key)
    if entry is None or entry["threshold_en"] is None or entry["threshold_other"] is None:
        raise KeyError(
            f"no published thresholds for {key!r}: calibrate them and set threshold_en / threshold_other in the "
            "models spec"
        )
    return dict(entry)


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
