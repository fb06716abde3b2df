"""The CLIP model resource: which models spec the `clip` asset scores with, and how it runs."""

from __future__ import annotations

from typing import Any

import dagster as dg

from curation.clip import ClipPassConfig
from resources.settings import read_models_spec

_C = ClipPassConfig()  # the core's defaults, the single source of the run options below but `num_workers`

# Without a spec: LAION's filter model from a local hub cache (set HF_HUB_OFFLINE=1 on air-gapped nodes).
DEFAULT_SPEC: dict[str, Any] = {"model_name": "ViT-B-32", "pretrained": "openai"}


class ClipModelResource(dg.ConfigurableResource):
    """The models spec (`spec_path`: JSON with model_name, pretrained, thresholds, heads, prompt sets; see
    `curation.scoring.ScoringConfig.from_spec`) and run options. `gpus` > 0 requests GPUs from SLURM."""

    spec_path: str | None = None
    device: str = _C.device
    precision: str = _C.precision
    batch_size: int = _C.batch_size
    num_workers: int = 2  # decode workers beside the model: a laptop's two cores (the core defaults to 4)
    gpus: int = 0
    walltime_s: int = 3600

    def spec(self) -> dict[str, Any]:
        """The models spec as a dict (the default ViT-B-32/openai one when no path is configured). A bad file is
        refused naming CURATION_CLIP_SPEC (`Settings.check` already refused it when the definitions loaded)."""
        if self.spec_path is None:
            return dict(DEFAULT_SPEC)
        return read_models_spec(self.spec_path)

    def clip_options(self) -> dict[str, Any]:
        """`ClipPassConfig` overrides sent to the payload."""
        return {"device": self.device, "precision": self.precision, "batch_size": self.batch_size,
                "num_workers": self.num_workers}
