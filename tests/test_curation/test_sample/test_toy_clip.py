"""The toy CLIP: config registry, seeded training, open_clip checkpoint loading, caching, and zero-shot quality."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch

from curation.io import file_sha256
from curation.models import MODEL_CONFIG_DIR, MODEL_DEFAULTS, model_defaults, register_model_configs
from curation.sample import toy_clip
from curation.sample.toy_clip import (
    TOY_MODEL_NAME,
    ToyClipTrainConfig,
    best_threshold,
    concept_names,
    ensure_toy_clip,
    load_cpu,
    train_toy_clip,
    zero_shot_accuracy,
)
from curation.sample.web import generate_sample_web
from tests.conftest import SampleWeb, free_port

# Held-out top-1 over 37 classes (chance 0.027) of the shipped config on the default web: the target.
ZERO_SHOT_FLOOR = 0.90
# A short budget on the 60-page fixture web: enough steps to move the weights, a few seconds to run.
# A few corpus pairs on top of 128 web pairs: the corpus path runs, cheaply.
TINY = ToyClipTrainConfig(
    epochs=2, batch_size=32, max_pairs=128, corpus_pairs=64, warmup_steps=2, log_every_steps=4
)


@pytest.fixture(scope="session")
def tiny_checkpoint(sample_web: SampleWeb, tmp_path_factory: pytest.TempPathFactory) -> str:
    return ensure_toy_clip(str(sample_web.root), str(tmp_path_factory.mktemp("toyclip-cache")), TINY)


def test_config_registers_idempotently_and_builds_offline() -> None:
    names = register_model_configs()
    assert TOY_MODEL_NAME in names
    assert TOY_MODEL_NAME in open_clip.list_models()
    search_path = list(open_clip.factory._MODEL_CONFIG_PATHS)
    assert register_model_configs() == names
    assert search_path == open_clip.factory._MODEL_CONFIG_PATHS  # a second call adds nothing
    cfg = json.loads((MODEL_CONFIG_DIR / f"{TOY_MODEL_NAME}.json").read_text())
    model, _, preprocess = open_clip.create_model_and_transforms(TOY_MODEL_NAME, pretrained=None)
    model.eval()
    with torch.no_grad():
        img = model.encode_image(torch.zeros(2, 3, 64, 64))
        txt = model.encode_text(open_clip.get_tokenizer(TOY_MODEL_NAME)(["a drawing of a red circle"]))
    assert img.shape == (2, cfg["embed_dim"]) and txt.shape == (1, cfg["embed_dim"])
    assert preprocess.transforms[0].size == cfg["vision_cfg"]["image_size"]


def test_every_sample_web_caption_fits_the_context(sample_web: SampleWeb) -> None:
    """Captions longer than the context would be truncated silently; the toy context must hold them all."""
    register_model_configs()
    tokenizer = open_clip.get_tokenizer(TOY_MODEL_NAME)
    context = open_clip.get_model_config(TOY_MODEL_NAME)["text_cfg"]["context_length"]
    assert tokenizer.context_length == context
    captions = {str(r["caption"]) for r in sample_web.truth() if r["caption"]}
    captions |= {p for c in concept_names() for p in toy_clip.concept_prompts(c)}
    longest = max(len(tokenizer.encode(c)) + 2 for c in captions)  # + start and end tokens
    assert longest <= context


@pytest.mark.parametrize(
    "bad",
    [
        {"epochs": 0},
        {"batch_size": 1},
        {"lr": 0.0},
        {"lr": 1.5},
        {"weight_decay": -0.1},
        {"warmup_steps": -1},
        {"threads": 0},
        {"crop_scale": (0.0, 1.0)},
        {"crop_scale": (0.9, 0.8)},
        {"predecode_factor": 0.5},
        {"max_pairs": 1},
        {"save_dtype": "bfloat16"},
        {"log_every_steps": 0},
        {"corpus_pairs": -1},
        {"corpus_workers": 0},
        {"behaviours": ("ok", "not_found")},
        {"behaviours": ()},
        {"model_name": ""},
    ],
)
def test_config_validation_rejects_bad_values(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ToyClipTrainConfig(**bad)  # type: ignore[arg-type]


def test_cli_refuses_a_bad_flag_value_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from curation.cli import main

    assert main(["train-toy-clip", str(tmp_path), "--cache", str(tmp_path), "--corpus-pairs", "-5"]) == 2
    assert "corpus_pairs must be >= 0, got -5" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


def test_training_is_deterministic_and_seeded(sample_web: SampleWeb, tiny_checkpoint: str, tmp_path: Path) -> None:
    again = train_toy_clip(str(sample_web.root), str(tmp_path / "again.pt"), replace(TINY, evaluate=False))
    first = torch.load(tiny_checkpoint, weights_only=True)
    second = torch.load(again.checkpoint_path, weights_only=True)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    meta = json.loads(Path(tiny_checkpoint + ".json").read_text())
    assert meta["epoch_losses"] == list(again.epoch_losses)

    other = train_toy_clip(
        str(sample_web.root), str(tmp_path / "other.pt"), replace(TINY, seed=1, evaluate=False, epochs=1)
    )
    third = torch.load(other.checkpoint_path, weights_only=True)
    assert not torch.equal(first["text_projection"], third["text_projection"])


def test_checkpoint_loads_through_open_clip_and_reproduces_embeddings(
    sample_web: SampleWeb, tiny_checkpoint: str
) -> None:
    state = torch.load(tiny_checkpoint, weights_only=True)
    model, _, _ = open_clip.create_model_and_transforms(TOY_MODEL_NAME, pretrained=tiny_checkpoint)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)

    # The embeddings recorded from the in-memory model at training time come back from the file.
    meta = json.loads(Path(tiny_checkpoint + ".json").read_text())
    probe = toy_clip.probe_embeddings(load_cpu(TOY_MODEL_NAME, tiny_checkpoint))
    for key in ("image_embedding_head", "text_embedding_head"):
        np.testing.assert_allclose(np.array(probe[key]), np.array(meta["probe"][key]), atol=1e-6)
    untrained = toy_clip.probe_embeddings(load_cpu(TOY_MODEL_NAME, None))
    assert not np.allclose(
        np.array(untrained["image_embedding_head"]), np.array(probe["image_embedding_head"]), atol=1e-3
    )

    # The sidecar is complete and its evaluation is what a fresh load measures.
    assert meta["model_name"] == TOY_MODEL_NAME
    assert meta["checkpoint_sha256"] == file_sha256(str(tiny_checkpoint))
    assert meta["sample_web_digest"] == toy_clip.sample_web_digest(str(sample_web.root))
    assert meta["train_config"]["epochs"] == TINY.epochs
    assert meta["n_pairs"] == 128 + TINY.corpus_pairs  # the web's capped pairs plus the corpus
    assert len(meta["epoch_losses"]) == TINY.epochs and meta["final_loss"] == meta["epoch_losses"][-1]
    acc = zero_shot_accuracy(TOY_MODEL_NAME, tiny_checkpoint, str(sample_web.root))
    assert acc == pytest.approx(meta["zero_shot"]["accuracy"])
    assert -1.0 <= meta["threshold_en"] <= 1.0 and -1.0 <= meta["threshold_other"] <= 1.0
    assert model_defaults(TOY_MODEL_NAME, tiny_checkpoint)["threshold_en"] == meta["threshold_en"]


def test_ensure_toy_clip_trains_once(
    sample_web: SampleWeb, tiny_checkpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = str(Path(tiny_checkpoint).parent)
    before = Path(tiny_checkpoint).stat().st_mtime_ns

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("ensure_toy_clip retrained a cached model")

    monkeypatch.setattr(toy_clip, "train_toy_clip", no_training)
    assert ensure_toy_clip(str(sample_web.root), cache, TINY) == tiny_checkpoint
    assert Path(tiny_checkpoint).stat().st_mtime_ns == before
    assert Path(tiny_checkpoint).name.startswith(f"{TOY_MODEL_NAME}-")
    # Another config is another key, so it would train.
    with pytest.raises(AssertionError, match="retrained"):
        ensure_toy_clip(str(sample_web.root), cache, replace(TINY, seed=3))


def test_cache_key_ignores_the_server_port_but_not_content(sample_web: SampleWeb, tmp_path: Path) -> None:
    moved = generate_sample_web(tmp_path / "moved", replace(sample_web.config, port=free_port()))
    assert moved["port"] != sample_web.config.port
    assert toy_clip.cache_key(str(tmp_path / "moved"), TINY) == toy_clip.cache_key(str(sample_web.root), TINY)
    assert toy_clip.cache_key(str(sample_web.root), replace(TINY, lr=1e-3)) != toy_clip.cache_key(
        str(sample_web.root), TINY
    )


def test_best_threshold_finds_the_gap_centre() -> None:
    t, bal = best_threshold([0.1, 0.2, 0.25, 0.6, 0.7, 0.9], [False, False, False, True, True, True])
    assert bal == 1.0 and t == pytest.approx(0.425)
    t, bal = best_threshold([0.1, 0.5, 0.4, 0.9], [False, False, True, True])
    assert t == pytest.approx(0.25) and bal == pytest.approx(0.75)  # two best runs (0.25, 0.7): the first
    with pytest.raises(ValueError):
        best_threshold([0.1, 0.2], [True, True])


def test_model_defaults() -> None:
    b32 = model_defaults("ViT-B-32", "openai")
    assert (b32["threshold_en"], b32["threshold_other"]) == (0.28, 0.26)
    assert "ViT-L-14/openai" in MODEL_DEFAULTS
    with pytest.raises(KeyError, match="calibrate"):
        model_defaults("ViT-L-14", "openai")  # no published filter threshold: must be calibrated
    with pytest.raises(KeyError):
        model_defaults("RN50", "nonexistent")


def test_default_toy_clip_zero_shot_and_calibration(sample_models: dict[str, Any]) -> None:
    """The shipped training config on the default sample web (the demo's model): held-out zero-shot top-1
    accuracy over the 37 concepts above the floor, and thresholds calibrated on the held-out split that
    separate matching from mismatched captions there."""
    meta = json.loads(Path(sample_models["pretrained"] + ".json").read_text())
    assert meta["train_config"] == json.loads(json.dumps(asdict(ToyClipTrainConfig())))
    assert meta["zero_shot"]["images"] >= 300
    assert len(concept_names()) == 37
    assert meta["zero_shot"]["accuracy"] >= ZERO_SHOT_FLOOR, meta["zero_shot"]
    for group in ("en", "other"):
        cal = meta["calibration"][group]
        assert cal["fitted_on"] == "heldout"
        assert cal["heldout_matched_above"] >= 0.95, cal
        assert cal["heldout_mismatched_below"] >= 0.95, cal
    assert meta["threshold_en"] == meta["calibration"]["en"]["threshold"]
