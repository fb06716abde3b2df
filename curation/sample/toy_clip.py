"""A toy CLIP the project trains on its own sample web and loads exactly like a real open_clip checkpoint.

- Its architecture config ships with the package in ``curation/model_configs/`` (``toy-clip``: 64 px, a small
  ModifiedResNet image tower and a 3-layer text transformer; 8.3M parameters, 6.3M of them the BPE token
  table), registered by `curation.models.register_model_configs`.
- `train_toy_clip(root, out_path, ToyClipTrainConfig())` trains it with open_clip's own contrastive loss on
  the sample web's matching (image, caption) pairs of the train split, plus (by default 20,000) pairs the
  sample-web generator draws fresh for training (`sample.web.training_corpus`: same distribution, a random
  stream no sample web uses, so held-out and fixture images stay unseen), and writes a plain ``state_dict``
  file, so ``open_clip.create_model_and_transforms("toy-clip", pretrained=out_path)`` loads it, plus a
  ``<out_path>.json`` sidecar (digests, training config, loss, held-out zero-shot accuracy, calibrated
  similarity thresholds).
- `zero_shot_accuracy(...)` classifies held-out sample-web images among every concept.
- `calibrate_thresholds(...)` picks the cosine thresholds that best separate matching from mismatched
  captions (recorded in the sidecar, where `curation.models.model_defaults` finds them).
- `ensure_toy_clip(root, cache_dir)` trains once per (training config, sample web) and reuses the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from curation.clip import ClipPassConfig, LoadedClip, load_clip
from curation.io import atomic_path, file_sha256, is_local, write_json
from curation.models import SIDECAR_SUFFIX, model_config
from curation.sample.web import COLOURS, SHAPE_PLURALS, SHAPES, UNSAFE_CONCEPT, recorded_config, shrink, training_corpus

log = logging.getLogger(__name__)

TOY_MODEL_NAME = "toy-clip"
# Download behaviours whose served bytes are the real image (see web.HTTP_BEHAVIOURS).
IMAGE_BEHAVIOURS = ("ok", "redirect", "slow", "x_robots_nofollow", "wrong_content_type")
SAVE_DTYPES = ("float32", "float16")
# Encoding batch sizes of the evaluation (batching can move the last bits of a CPU forward pass).
IMAGE_BATCH, TEXT_BATCH = 256, 512
# Bumped whenever training code changes what a given config produces, so cached checkpoints are retrained.
TRAIN_CODE_VERSION = 4

# Zero-shot prompts: every colour x shape concept, plus the unsafe stand-in.
CONCEPT_TEMPLATES = (
    "a drawing of a {colour} {shape}",
    "{colour} {plural}",
    "one {colour} {shape}",
    "an illustration with {colour} {plural}",
    "stock picture: {colour} {plural}",
)
# Fixed inputs whose embeddings the sidecar records, so a loaded checkpoint can be checked against training.
PROBE_TEXTS = ("a drawing of a red circle", "Eine Zeichnung mit zwei Sternen in der Farbe Blau", "hazard")
PROBE_DIMS = 8
HAZARD_PROMPTS = (
    "a hazard warning sign",
    "black and yellow hazard stripes",
    "a danger hazard warning triangle",
    "hazard zone warning symbol",
)


def concept_names() -> list[str]:
    """Every zero-shot class: "<colour> <shape>" for all colours and shapes, then the hazard concept."""
    return [f"{c} {s}" for c in COLOURS for s in SHAPES] + [UNSAFE_CONCEPT]


def concept_prompts(concept: str) -> list[str]:
    """The prompts whose mean text embedding represents one concept."""
    if concept == UNSAFE_CONCEPT:
        return list(HAZARD_PROMPTS)
    colour, shape = concept.split(" ", 1)
    return [t.format(colour=colour, shape=shape, plural=SHAPE_PLURALS[shape]) for t in CONCEPT_TEMPLATES]


# --------------------------------------------------------------------------------------------------
# Training config and report


@dataclass(frozen=True)
class ToyClipTrainConfig:
    """How to train the toy CLIP. Every field is validated; training is a pure function of these values
    and the sample web (same seed, same thread count, same machine type -> same weights)."""

    model_name: str = TOY_MODEL_NAME
    seed: int = 0
    epochs: int = 15
    # Large batches: each caption meets more near-miss negatives (same concept, other background, grain or
    # watermark), which is what teaches the embedding the cues the aesthetic and watermark heads read.
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    threads: int = 2
    # Random-resized-crop scale range of open_clip's train transform.
    crop_scale: tuple[float, float] = (0.8, 1.0)
    # Images are decoded once and kept this much larger than the model's input (shortest side).
    predecode_factor: float = 1.25
    # Cap on training pairs (after the deterministic shuffle); None uses them all. Tests use small caps.
    max_pairs: int | None = None
    # Extra matched pairs drawn fresh by the sample-web generator (`web.training_corpus`, whose random
    # stream no sample web shares), added to the web's own train split. 0 trains on the web alone. The web's
    # ~1,700 pairs alone overfit (held-out zero-shot 0.53); 20,000 more reach 0.94.
    corpus_pairs: int = 20_000
    corpus_seed: int = 0
    corpus_workers: int = 2
    save_dtype: str = "float32"
    log_every_steps: int = 20
    behaviours: tuple[str, ...] = IMAGE_BEHAVIOURS
    # Evaluate zero-shot accuracy and calibrate thresholds after training (written to the sidecar).
    evaluate: bool = True

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name must name an open_clip config")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (a contrastive batch needs negatives), got {self.batch_size}")
        if not (0.0 < self.lr < 1.0):
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if self.weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {self.crop_scale}")
        if self.predecode_factor < 1.0:
            raise ValueError(f"predecode_factor must be >= 1, got {self.predecode_factor}")
        if self.max_pairs is not None and self.max_pairs < 2:
            raise ValueError(f"max_pairs must be None or >= 2, got {self.max_pairs}")
        if self.corpus_pairs < 0:
            raise ValueError(f"corpus_pairs must be >= 0, got {self.corpus_pairs}")
        if self.corpus_workers < 1:
            raise ValueError(f"corpus_workers must be >= 1, got {self.corpus_workers}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype must be one of {SAVE_DTYPES}, got {self.save_dtype!r}")
        if self.log_every_steps < 1:
            raise ValueError(f"log_every_steps must be >= 1, got {self.log_every_steps}")
        unknown = set(self.behaviours) - set(IMAGE_BEHAVIOURS)
        if not self.behaviours or unknown:
            raise ValueError(f"behaviours must be a non-empty subset of {IMAGE_BEHAVIOURS}, got {self.behaviours}")


@dataclass(frozen=True)
class TrainReport:
    """What `train_toy_clip` did: where the files are, how training went, and the evaluation."""

    checkpoint_path: str
    sidecar_path: str
    model_name: str
    checkpoint_sha256: str
    checkpoint_bytes: int
    n_params: int
    n_pairs: int
    n_skipped: int
    steps: int
    epoch_losses: tuple[float, ...]
    final_loss: float
    train_seconds: float
    zero_shot_accuracy: float | None
    zero_shot_images: int
    thresholds: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Sample-web data


def truth_rows(sample_web_root: str) -> list[dict[str, Any]]:
    """The sample web's truth table as row dicts (raises FileNotFoundError with the path when missing)."""
    path = Path(sample_web_root) / "truth.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"no truth.parquet under {sample_web_root!r}: generate the sample web first")
    return pq.read_table(path).to_pylist()


def sample_web_digest(sample_web_root: str) -> str:
    """sha256 of the sample web's content truth (served bytes, captions, labels, splits).

    URLs are left out on purpose: they carry the server port, which does not change what a model learns.
    """
    keys = ("file", "sha256", "caption", "caption_matches", "language", "concept", "split", "http_behavior")
    rows = sorted(
        (tuple(str(r[k]) for k in keys) for r in truth_rows(sample_web_root) if r["file"] is not None),
    )
    h = hashlib.sha256()
    for row in rows:
        h.update("\x1f".join(row).encode())
        h.update(b"\x1e")
    return h.hexdigest()


def open_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def _predecode(path: Path, shortest_side: int) -> Image.Image:
    """Decode once and shrink so the shortest side is `shortest_side` (never enlarges)."""
    with Image.open(path) as im:
        return shrink(im, shortest_side)


def image_rows(rows: Sequence[dict[str, Any]], behaviours: Sequence[str], split: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["http_behavior"] in behaviours and r["split"] == split and r["file"] is not None]


# --------------------------------------------------------------------------------------------------
# Training


@contextmanager
def _torch_state(seed: int, threads: int) -> Iterator[None]:
    """Seed torch/numpy, set the thread count and flush denormals for a block; restore RNGs and threads after.

    Flushing denormals matters: without it, AdamW moments and activations drifting into the denormal
    range made CPU training steps ~20x slower after the first epochs. torch has no getter for the flag,
    so it is turned back off (torch's default) on exit.
    """
    old_threads = torch.get_num_threads()
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        torch.set_num_threads(threads)
        torch.set_flush_denormal(True)
        try:
            yield
        finally:
            torch.set_flush_denormal(False)
            torch.set_num_threads(old_threads)
            np.random.set_state(np_state)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """open_clip's split: no decay on gains, biases, norms, embeddings-as-vectors and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    """Multiplier on the base lr: linear warmup, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _training_pairs(root: Path, rows: Sequence[dict[str, Any]], config: ToyClipTrainConfig, shortest: int
                    ) -> tuple[list[Image.Image], list[str], int]:
    """(images, captions, skipped): the web's matching train pairs, shuffled and capped, then the corpus pairs."""
    started = time.perf_counter()
    train = [r for r in image_rows(rows, config.behaviours, "train") if r["caption_matches"]]
    train.sort(key=lambda r: (r["file"], r["caption"]))
    order = np.random.default_rng(config.seed).permutation(len(train))
    train = [train[i] for i in order]
    if config.max_pairs is not None:
        train = train[: config.max_pairs]
    images: list[Image.Image] = []
    captions: list[str] = []
    skipped = 0
    for r in train:
        try:
            images.append(_predecode(root / r["file"], shortest))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            skipped += 1
            log.warning("toy-clip: skipping %s (%s)", r["file"], e)
            continue
        captions.append(str(r["caption"]))
    if config.corpus_pairs:
        t_corpus = time.perf_counter()
        corpus = training_corpus(config.corpus_pairs, seed=config.corpus_seed, shortest_side=shortest,
                                 cfg=recorded_config(root), workers=config.corpus_workers)
        images.extend(Image.fromarray(ex.image) for ex in corpus)
        captions.extend(ex.caption for ex in corpus)
        log.info("toy-clip: %d corpus pairs drawn in %.1fs", len(corpus), time.perf_counter() - t_corpus)
    if len(images) < 2:
        raise ValueError(f"only {len(images)} usable training pairs under {str(root)!r}")
    log.info("toy-clip: %d pairs (%d skipped) decoded in %.1fs", len(images), skipped, time.perf_counter() - started)
    return images, captions, skipped


def _fit(model: torch.nn.Module, train_tf: Any, tokens: torch.Tensor, images: Sequence[Image.Image],
         config: ToyClipTrainConfig) -> tuple[list[float], int]:
    """open_clip's contrastive loss with AdamW and a warmup + cosine schedule; (mean loss per epoch, steps)."""
    import open_clip

    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    n = len(images)
    batch = min(config.batch_size, n)
    steps_per_epoch = n // batch  # drop the ragged tail: every step sees a full contrastive batch
    total = steps_per_epoch * config.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, total, config.warmup_steps))
    log.info("toy-clip: training %s (%.2fM params) for %d epochs x %d steps of %d", config.model_name,
             sum(p.numel() for p in model.parameters()) / 1e6, config.epochs, steps_per_epoch, batch)
    model.train()
    epoch_losses: list[float] = []
    step = 0
    for epoch in range(config.epochs):
        perm = torch.randperm(n).tolist()
        losses = []
        for b in range(steps_per_epoch):
            idx = perm[b * batch : (b + 1) * batch]
            x = torch.stack([train_tf(images[i]) for i in idx])
            img_f, txt_f, scale = model(x, tokens[idx])
            loss = loss_fn(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():  # CLIP's clamp: the temperature never exceeds 100
                model.logit_scale.clamp_(0, math.log(100))  # type: ignore[operator]
            losses.append(float(loss.detach()))
            step += 1
            if step % config.log_every_steps == 0:
                log.info("toy-clip: step %d/%d loss %.4f lr %.2e scale %.1f", step, total, losses[-1],
                         sched.get_last_lr()[0], float(scale.detach()))
        epoch_losses.append(float(np.mean(losses)))
        log.info("toy-clip: epoch %d/%d mean loss %.4f", epoch + 1, config.epochs, epoch_losses[-1])
    model.eval()
    return epoch_losses, step


def _state_bytes(model: torch.nn.Module, save_dtype: str) -> bytes:
    state = model.state_dict()
    if save_dtype == "float16":
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _evaluate(checkpoint: str, root: Path, rows: Sequence[dict[str, Any]], config: ToyClipTrainConfig
              ) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """(zero-shot figures, calibration, thresholds) of a written checkpoint, loaded back as users load it."""
    if not config.evaluate:
        return {"accuracy": None, "images": 0}, {}, {}
    with _torch_state(config.seed, config.threads):
        clip = load_cpu(config.model_name, checkpoint)
        zs = _zero_shot(clip, root, rows, "heldout")
        calibration = _calibrate(clip, root, rows, config.behaviours)
    thresholds = {"threshold_en": calibration["en"]["threshold"], "threshold_other": calibration["other"]["threshold"]}
    log.info("toy-clip: held-out zero-shot %.3f on %d images; thresholds %s", zs["accuracy"], zs["images"], thresholds)
    return zs, calibration, thresholds


def train_toy_clip(sample_web_root: str, out_path: str, config: ToyClipTrainConfig) -> TrainReport:
    """Train the toy CLIP on a sample web; write the state_dict to `out_path` and a sidecar to `out_path`.json.

    Pairs are the truth rows of the train split whose image is really served (`config.behaviours`) and whose
    caption matches it, in all languages. The checkpoint is written last (atomically), after it has been
    loaded back through `open_clip.create_model_and_transforms(model_name, pretrained=<file>)` for the
    evaluation, so a checkpoint on disk always loads and always has its sidecar.
    """
    import open_clip

    if not is_local(out_path) or not is_local(sample_web_root):
        raise ValueError("train_toy_clip reads and writes local paths only (open_clip loads local files)")
    root = Path(sample_web_root)
    rows = truth_rows(sample_web_root)
    arch = model_config(config.model_name)
    image_size = int(arch["vision_cfg"]["image_size"])
    t_start = time.perf_counter()
    with _torch_state(config.seed, config.threads):
        shortest = max(image_size, round(image_size * config.predecode_factor))
        images, captions, skipped = _training_pairs(root, rows, config, shortest)
        model, train_tf, preprocess = open_clip.create_model_and_transforms(
            config.model_name, pretrained=None, aug_cfg={"scale": config.crop_scale})
        tokenizer = open_clip.get_tokenizer(config.model_name)
        n_params = sum(p.numel() for p in model.parameters())
        epoch_losses, steps = _fit(model, train_tf, tokenizer(captions), images, config)
        train_seconds = time.perf_counter() - t_start
        cpu = LoadedClip(model, preprocess, tokenizer, torch.device("cpu"), "fp32", config.model_name)
        probe = probe_embeddings(cpu)
        data = _state_bytes(model, config.save_dtype)

    checkpoint_sha = hashlib.sha256(data).hexdigest()
    sidecar_path = out_path + SIDECAR_SUFFIX
    with atomic_path(out_path) as tmp:
        Path(tmp).write_bytes(data)
        zs, calibration, thresholds = _evaluate(tmp, root, rows, config)
        manifest = root / "manifest.json"
        sidecar = {
            "model_name": config.model_name,
            "checkpoint_sha256": checkpoint_sha,
            "checkpoint_bytes": len(data),
            "n_params": n_params,
            "model_config": arch,
            "train_config": asdict(config),
            "sample_web_digest": sample_web_digest(sample_web_root),
            "sample_web_manifest_sha256": file_sha256(str(manifest)) if manifest.is_file() else None,
            "n_pairs": len(images),
            "n_skipped": skipped,
            "steps": steps,
            "epoch_losses": epoch_losses,
            "final_loss": epoch_losses[-1],
            "train_seconds": round(train_seconds, 2),
            "zero_shot": {"split": "heldout", **zs},
            "probe": probe,
            "calibration": calibration,
            **thresholds,
            "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__},
        }
        write_json(sidecar, sidecar_path)
    return TrainReport(
        checkpoint_path=out_path, sidecar_path=sidecar_path, model_name=config.model_name,
        checkpoint_sha256=checkpoint_sha, checkpoint_bytes=len(data), n_params=n_params, n_pairs=len(images),
        n_skipped=skipped, steps=steps, epoch_losses=tuple(epoch_losses), final_loss=epoch_losses[-1],
        train_seconds=train_seconds, zero_shot_accuracy=zs["accuracy"], zero_shot_images=int(zs["images"]),
        thresholds=thresholds, calibration=calibration,
    )


# --------------------------------------------------------------------------------------------------
# Loading and evaluation


def probe_images() -> list[Image.Image]:
    """Three fixed noise images (a pure function of nothing) for `probe_embeddings`."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, size=(80, 96, 3), dtype=np.uint8)) for _ in range(3)]


def probe_embeddings(clip: LoadedClip) -> dict[str, Any]:
    """The first `PROBE_DIMS` dimensions of the embeddings of `probe_images()` and `PROBE_TEXTS`."""
    img = clip.encode_images(probe_images(), IMAGE_BATCH)[:, :PROBE_DIMS]
    txt = clip.encode_texts(list(PROBE_TEXTS), TEXT_BATCH)[:, :PROBE_DIMS]
    return {"texts": list(PROBE_TEXTS), "image_embedding_head": img.tolist(), "text_embedding_head": txt.tolist()}


def load_cpu(model_name: str, pretrained: str | None) -> LoadedClip:
    """A model through the CLIP pass's own loader, on CPU in fp32 (training and evaluation are CPU work)."""
    return load_clip(ClipPassConfig(model_name=model_name, pretrained=pretrained, device="cpu", precision="fp32"))


def distinct_images(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per distinct served image (exact copies share bytes), in a stable order."""
    seen: dict[str, dict[str, Any]] = {}
    for r in sorted(rows, key=lambda r: r["file"]):
        seen.setdefault(str(r["sha256"]), r)
    return list(seen.values())


def _zero_shot(clip: LoadedClip, root: Path, rows: Sequence[dict[str, Any]], split: str) -> dict[str, Any]:
    targets = distinct_images(image_rows(rows, ("ok",), split))
    if not targets:
        raise ValueError(f"no '{split}' images with http_behavior 'ok' in the sample web")
    names = concept_names()
    classifier = np.stack([clip.encode_texts(concept_prompts(c), TEXT_BATCH).mean(0) for c in names])
    classifier /= np.maximum(np.linalg.norm(classifier, axis=1, keepdims=True), 1e-12)
    img = clip.encode_images([open_rgb(root / r["file"]) for r in targets], IMAGE_BATCH)
    pred = (img @ classifier.T).argmax(axis=1).tolist()
    correct = [names[p] == r["concept"] for p, r in zip(pred, targets, strict=True)]
    errors: dict[str, int] = {}
    for p, r, ok in zip(pred, targets, correct, strict=True):
        if not ok:
            key = f"{r['concept']} -> {names[p]}"
            errors[key] = errors.get(key, 0) + 1
    top_errors = dict(sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))[:10])
    return {"accuracy": float(np.mean(correct)), "images": len(targets), "top_confusions": top_errors}


def zero_shot_accuracy(model_name: str, pretrained: str | None, sample_web_root: str, split: str = "heldout") -> float:
    """Top-1 accuracy of classifying each distinct `split` image served "ok" among `concept_names()`.

    Each concept is the mean embedding of its prompts (`concept_prompts`); images use the model's own
    inference transform. `pretrained` is a tag or a checkpoint file, exactly as open_clip takes it.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    clip = load_cpu(model_name, pretrained)
    return float(_zero_shot(clip, Path(sample_web_root), truth_rows(sample_web_root), split)["accuracy"])


# --------------------------------------------------------------------------------------------------
# Threshold calibration


def best_threshold(scores: Sequence[float], positive: Sequence[bool]) -> tuple[float, float]:
    """(threshold, balanced accuracy) of the rule `score >= threshold` that best separates the labels.

    Candidates are midpoints between consecutive distinct scores (plus one below and one above all);
    among equally good ones the middle of the first best run is taken, so a clean gap yields its centre.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(positive, dtype=bool)
    if s.shape != y.shape or s.size == 0:
        raise ValueError("scores and labels must be non-empty and of equal length")
    if y.all() or not y.any():
        raise ValueError("calibration needs both matching and mismatched examples")
    u = np.unique(s)
    cands = np.concatenate([[u[0] - 1e-3], (u[:-1] + u[1:]) / 2, [u[-1] + 1e-3]])
    tpr = (s[y][None, :] >= cands[:, None]).mean(axis=1)
    tnr = (s[~y][None, :] < cands[:, None]).mean(axis=1)
    bal = (tpr + tnr) / 2
    best = bal.max()
    first = int(np.argmax(bal >= best - 1e-12))
    last = first
    while last + 1 < len(bal) and bal[last + 1] >= best - 1e-12:
        last += 1
    return float((cands[first] + cands[last]) / 2), float(best)


def pair_similarities(clip: LoadedClip, root: Path, rows: Sequence[dict[str, Any]]) -> np.ndarray:
    """Cosine similarity of each row's image and caption under a loaded model."""
    img = clip.encode_images([open_rgb(root / r["file"]) for r in rows], IMAGE_BATCH)
    txt = clip.encode_texts([str(r["caption"]) for r in rows], TEXT_BATCH)
    return (img * txt).sum(axis=1)


def _calibrate(
    clip: LoadedClip, root: Path, rows: Sequence[dict[str, Any]], behaviours: Sequence[str]
) -> dict[str, Any]:
    """Per language group: the threshold fitted on the held-out split, with how it splits both splits.

    The held-out split is the calibration set: the model never trained on it, and on its own training pairs
    a small model is overconfident (matching train captions score ~0.92 +- 0.03, held-out ones ~0.87 +- 0.08),
    so a threshold fitted there drops held-out matches. Test figures come from a different web entirely.
    """
    out: dict[str, Any] = {}
    by_split = {s: image_rows(rows, behaviours, s) for s in ("train", "heldout")}
    sims = {s: pair_similarities(clip, root, rs) for s, rs in by_split.items()}
    for group in ("en", "other"):
        stats: dict[str, Any] = {}
        for s, rs in by_split.items():
            mask = np.array([(r["language"] == "en") == (group == "en") for r in rs], dtype=bool)
            match = np.array([bool(r["caption_matches"]) for r in rs], dtype=bool)[mask]
            stats[s] = (sims[s][mask], match)
        fit_s, fit_y = stats["heldout"]
        threshold, bal = best_threshold(fit_s, fit_y)
        train_s, train_y = stats["train"]
        out[group] = {
            "threshold": round(threshold, 4),
            "fitted_on": "heldout",
            "heldout_balanced_accuracy": round(bal, 4),
            "heldout_pairs": int(fit_y.size),
            "heldout_mismatched": int((~fit_y).sum()),
            "heldout_matched_above": _rate(fit_s[fit_y] >= threshold),
            "heldout_mismatched_below": _rate(fit_s[~fit_y] < threshold),
            "train_pairs": int(train_y.size),
            "train_matched_above": _rate(train_s[train_y] >= threshold),
            "train_mismatched_below": _rate(train_s[~train_y] < threshold),
            "mean_matched": {"train": _mean(train_s[train_y]), "heldout": _mean(fit_s[fit_y])},
            "mean_mismatched": {"train": _mean(train_s[~train_y]), "heldout": _mean(fit_s[~fit_y])},
        }
    return out


def _rate(flags: np.ndarray) -> float | None:
    return round(float(flags.mean()), 4) if flags.size else None


def _mean(values: np.ndarray) -> float | None:
    return round(float(values.mean()), 4) if values.size else None


def calibrate_thresholds(model_name: str, pretrained: str | None, sample_web_root: str) -> dict[str, Any]:
    """Fit per-language-group keep thresholds for a model on the sample web's held-out split (see `_calibrate`).

    Returns ``{"threshold_en", "threshold_other", "en": {...}, "other": {...}}``: the thresholds maximising
    balanced accuracy between matching and mismatched captions, and how they separate the held-out pairs.
    """
    clip = load_cpu(model_name, pretrained)
    cal = _calibrate(clip, Path(sample_web_root), truth_rows(sample_web_root), IMAGE_BEHAVIOURS)
    return {"threshold_en": cal["en"]["threshold"], "threshold_other": cal["other"]["threshold"], **cal}


# --------------------------------------------------------------------------------------------------
# Cache


def cache_key(sample_web_root: str, config: ToyClipTrainConfig) -> str:
    """Short hash of the training config, the architecture config and the sample web's content digest."""
    payload = json.dumps(
        {
            "train_config": asdict(config),
            "model_config": model_config(config.model_name),
            "sample_web": sample_web_digest(sample_web_root),
            "code_version": TRAIN_CODE_VERSION,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def ensure_toy_clip(sample_web_root: str, cache_dir: str, config: ToyClipTrainConfig | None = None) -> str:
    """Path of a trained toy-CLIP checkpoint for this sample web and config, training it only when missing.

    The file is ``<cache_dir>/toy-clip-<key>.pt`` (`cache_key`); it counts as present only with its sidecar.
    """
    config = config or ToyClipTrainConfig()
    path = Path(cache_dir) / f"{config.model_name}-{cache_key(sample_web_root, config)}.pt"
    if path.is_file() and Path(str(path) + SIDECAR_SUFFIX).is_file():
        log.info("toy-clip: using cached %s", path)
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    train_toy_clip(sample_web_root, str(path), config)
    return str(path)
