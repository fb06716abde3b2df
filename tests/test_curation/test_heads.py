"""Score heads: LAION architectures, training on labelled embeddings, save/load round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from curation.cli import main
from curation.heads import HeadTrainConfig, build_head, load_head, train_head


def _clusters(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two overlapping Gaussian clusters on the sphere; label 1 for the second."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(2, dim))
    labels = (rng.random(n) < 0.2).astype(np.float32)
    x = centre[labels.astype(int)] + rng.normal(scale=1.2, size=(n, dim))
    return x.astype(np.float32), labels


def test_laion_architectures_have_laions_shapes() -> None:
    nsfw = build_head("nsfw_mlp", 768)
    assert [m.out_features for m in nsfw if isinstance(m, torch.nn.Linear)] == [64, 512, 256, 1]
    v2 = build_head("mlp_v2", 768)
    assert [m.out_features for m in v2 if isinstance(m, torch.nn.Linear)] == [1024, 128, 64, 16, 1]
    assert not any(isinstance(m, torch.nn.ReLU) for m in v2)  # v2 is effectively linear
    assert [m.out_features for m in build_head("linear", 512) if isinstance(m, torch.nn.Linear)] == [1]


@pytest.mark.parametrize("kind", ["punsafe", "pwatermark"])
def test_binary_heads_separate_held_out_data(kind: str, tmp_path: Path) -> None:
    x, y = _clusters(1200, 32, seed=1)
    path = str(tmp_path / f"{kind}.pt")
    meta = train_head(x[:900], y[:900], HeadTrainConfig(kind=kind, epochs=60), path, clip_model="test-clip")
    head = load_head(path)
    threshold = 0.5 if kind == "punsafe" else 0.8
    accuracy = np.mean((head.score(x[900:]) > threshold) == (y[900:] > 0.5))
    assert accuracy > 0.9, accuracy
    assert meta["sha256"] == head.sha256 and head.clip_model == "test-clip" and head.dim == 32


def test_aesthetic_head_ranks_like_the_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(800, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    w = rng.normal(size=24)
    y = (5 + 2 * x @ w).astype(np.float32)
    path = str(tmp_path / "aesthetic.pt")
    train_head(x[:600], y[:600], HeadTrainConfig(kind="aesthetic", epochs=200, lr=1e-2), path, clip_model="m")
    pred = load_head(path).score(x[600:])
    rank = lambda a: np.argsort(np.argsort(a))  # noqa: E731
    assert np.corrcoef(rank(pred), rank(y[600:]))[0, 1] > 0.9


def test_heads_normalise_their_input(tmp_path: Path) -> None:
    x, y = _clusters(300, 16, seed=3)
    path = str(tmp_path / "h.pt")
    train_head(x, y, HeadTrainConfig(kind="punsafe", epochs=5), path, clip_model="m")
    head = load_head(path)
    assert np.allclose(head.score(x), head.score(x * 37.0), atol=1e-5)


def test_config_and_inputs_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind"):
        HeadTrainConfig(kind="nsfw")
    with pytest.raises(ValueError, match="use"):
        HeadTrainConfig(kind="punsafe", architecture="linear")
    with pytest.raises(ValueError, match="labels"):
        train_head(np.zeros((3, 4)), np.zeros(2), HeadTrainConfig(kind="punsafe"), str(tmp_path / "x.pt"), "m")
    with pytest.raises(FileNotFoundError, match="sidecar"):
        load_head(str(tmp_path / "missing.pt"))


def test_cli_train_head(tmp_path: Path) -> None:
    x, y = _clusters(400, 16, seed=4)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    out = tmp_path / "head.pt"
    argv = [
        "train-head",
        "--kind",
        "punsafe",
        "--embeddings",
        str(tmp_path / "x.npy"),
        "--labels",
        str(tmp_path / "y.npy"),
        "--clip-model",
        "toy-clip",
        "--epochs",
        "30",
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    assert load_head(str(out)).kind == "punsafe"
