"""Score heads on CLIP image embeddings: `punsafe`, `pwatermark` and `aesthetic`, with LAION's architectures.

- `punsafe`: LAION's CLIP-based-NSFW-Detector MLP (d -> 64 -> 512 -> 256 -> 1, ReLU, sigmoid), on the
  L2-normalised image embedding; > 0.5 means unsafe.
- `aesthetic`: LAION aesthetic predictor v1 (`Linear(d, 1)`) or v2 (d -> 1024 -> 128 -> 64 -> 16 -> 1 with
  dropout and no activations), on the L2-normalised embedding; a 0-10 score.
- `pwatermark`: LAION's watermark model is a pixel CNN (efficientnet_b3a). This project runs one CLIP
  pass, so its watermark head is an MLP on the image embedding (d -> 256 -> 2, softmax[:, 0] =
  P(watermark)), with LAION's head shape but not its backbone; > 0.8 means watermarked.

Heads are saved as a state_dict plus a JSON sidecar (kind, architecture, input dim, the CLIP model they
belong to, training figures) and identified by the checkpoint's sha256, recorded with every score.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from curation import records as R
from curation.io import file_sha256
from curation.safety import FLAG_THRESHOLDS

KINDS = R.HEAD_KINDS
ARCHITECTURES = {"punsafe": ("nsfw_mlp",), "pwatermark": ("watermark_mlp",), "aesthetic": ("linear", "mlp_v2")}


def build_head(architecture: str, dim: int) -> nn.Module:
    """The torch module of a head architecture for `dim`-dimensional embeddings."""
    if architecture == "nsfw_mlp":
        return nn.Sequential(
            nn.Linear(dim, 64),
            nn.ReLU(),
            nn.Linear(64, 512),
            nn.ReLU(),
            nn.Linear(512, 256),
            nn.ReLU(),
            nn.Linear(256, 1),
        )
    if architecture == "watermark_mlp":
        return nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Dropout(0.3), nn.Linear(256, 2))
    if architecture == "linear":
        return nn.Sequential(nn.Linear(dim, 1))
    if architecture == "mlp_v2":
        return nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )
    raise ValueError(f"unknown head architecture {architecture!r}")


@dataclass(frozen=True)
class HeadTrainConfig:
    """How `train_head` fits a head; validated on construction."""

    kind: str
    architecture: str = ""
    epochs: int = 200
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"head kind must be one of {KINDS}, got {self.kind!r}")
        if self.architecture and self.architecture not in ARCHITECTURES[self.kind]:
            raise ValueError(f"{self.kind} heads use {ARCHITECTURES[self.kind]}, got {self.architecture!r}")
        if self.epochs < 1 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1 and lr > 0")

    @property
    def arch(self) -> str:
        return self.architecture or ARCHITECTURES[self.kind][0]


@dataclass(frozen=True)
class Head:
    """A loaded head: `score(embeddings)` gives P(unsafe), P(watermark) or the aesthetic score."""

    kind: str
    architecture: str
    dim: int
    clip_model: str
    sha256: str
    module: nn.Module

    @torch.no_grad()
    def score(self, embeddings: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(_normalise(embeddings))
        self.module.eval()
        out = self.module(x)
        if self.kind == "punsafe":
            return torch.sigmoid(out[:, 0]).numpy()
        if self.kind == "pwatermark":
            return torch.softmax(out, dim=1)[:, 0].numpy()
        return out[:, 0].numpy()


def _normalise(embeddings: np.ndarray) -> np.ndarray:
    """L2-normalised float32 rows: every head takes normalised input (unnormalised input is the classic
    aesthetic-predictor mistake that gives scores of 20-30)."""
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def train_head(
    embeddings: np.ndarray, labels: np.ndarray, config: HeadTrainConfig, out_path: str, clip_model: str
) -> dict[str, Any]:
    """Fit a head on labelled embeddings and save it (state_dict + `<out_path>.json`); returns the sidecar.

    Labels: 0/1 for `punsafe` (1 = unsafe) and `pwatermark` (1 = watermarked), a 0-10 score for
    `aesthetic`. The sidecar records training accuracy (or MSE) and the checkpoint's sha256.
    """
    x = torch.from_numpy(_normalise(embeddings))
    y = torch.from_numpy(np.asarray(labels, dtype=np.float32))
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many labels as embeddings (got {len(x)} embeddings, {len(y)} labels)")
    torch.manual_seed(config.seed)
    module = build_head(config.arch, x.shape[1])
    opt = torch.optim.AdamW(module.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.kind == "punsafe":
        pos = float(y.sum())
        weight = torch.tensor((len(y) - pos) / max(pos, 1.0))  # balance rare positives
        loss_fn: nn.Module = nn.BCEWithLogitsLoss(pos_weight=weight)
    elif config.kind == "pwatermark":
        counts = torch.bincount(y.long(), minlength=2).float()
        loss_fn = nn.CrossEntropyLoss(weight=counts.sum() / (2 * counts.clamp(min=1)))
    else:
        loss_fn = nn.MSELoss()
    gen = torch.Generator().manual_seed(config.seed)
    module.train()
    for _ in range(config.epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), config.batch_size):
            idx = order[start : start + config.batch_size]
            out = module(x[idx])
            if config.kind == "punsafe":
                loss = loss_fn(out[:, 0], y[idx])
            elif config.kind == "pwatermark":
                loss = loss_fn(out, 1 - y[idx].long())  # class 0 = watermark, as in LAION's model
            else:
                loss = loss_fn(out[:, 0], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    head = Head(config.kind, config.arch, int(x.shape[1]), clip_model, "", module)
    scores = head.score(x.numpy())
    if config.kind == "aesthetic":
        fit = {"train_mse": float(np.mean((scores - y.numpy()) ** 2))}
    else:
        threshold = FLAG_THRESHOLDS[config.kind]
        fit = {"train_accuracy": float(np.mean((scores > threshold) == (y.numpy() > 0.5)))}
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), out_path)
    sidecar = {
        "kind": config.kind,
        "architecture": config.arch,
        "dim": int(x.shape[1]),
        "clip_model": clip_model,
        "sha256": file_sha256(out_path),
        "n": len(x),
        "config": asdict(config),
        **fit,
    }
    Path(f"{out_path}.json").write_text(json.dumps(sidecar, indent=2, sort_keys=True))
    return sidecar


def load_head(path: str) -> Head:
    """Load a head saved by `train_head` (or any state_dict with a matching sidecar)."""
    meta_path = Path(f"{path}.json")
    if not meta_path.exists():
        raise FileNotFoundError(
            f"head {path} has no sidecar {meta_path}; it records the head's kind, architecture and input dim"
        )
    meta = json.loads(meta_path.read_text())
    module = build_head(meta["architecture"], int(meta["dim"]))
    module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    module.eval()
    return Head(
        meta["kind"], meta["architecture"], int(meta["dim"]), meta.get("clip_model", ""), file_sha256(path), module
    )
