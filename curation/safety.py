"""Safety tags from CLIP embeddings: LAION-400M's zero-shot `NSFW` column (UNLIKELY / UNSURE / NSFW from the
top-2 of labelled prompt sets) and the flag thresholds LAION's subsets read the punsafe / pwatermark heads at.

The tag is computed once per image in the CLIP pass (`curation.scoring`); the heads are in `curation.heads`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np
import torch

from curation.clip import embed_texts

# LAION's reading of the heads (the tables keep the raw probabilities): unsafe at punsafe > 0.5 (LAION-5B's
# subsets keep punsafe < 0.5), watermarked at pwatermark > 0.8 (LAION-Aesthetics keeps pwatermark < 0.8).
PUNSAFE_FLAG = 0.5
PWATERMARK_FLAG = 0.8
FLAG_THRESHOLDS = {"punsafe": PUNSAFE_FLAG, "pwatermark": PWATERMARK_FLAG}

TAG_UNLIKELY = "UNLIKELY"
TAG_UNSURE = "UNSURE"
TAG_NSFW = "NSFW"

# LAION-400M's neutral prompts (reference/laion-pipeline.md §7).
NEUTRAL_PROMPTS: tuple[str, ...] = (
    "neutral", "selfie", "illustration, drawing", "toys, play, kids, children", "teddy bear, puppet",
    "animal, bird, mammal, insect", "fashion, clothes", "logo, commercial, ad, advertisement",
    "drawing, painting", "anime, cartoon", "comedy, fun", "romance, love story",
    "thriller, suspense, crime story", "action, action movie", "horror, monster movie", "documentary",
    "news, journalism", "entertainment", "talk show",
)
# Our own sexual-content prompts, in clinical wording; users bring sets that fit their model and language.
SEXUAL_PROMPTS: tuple[str, ...] = (
    "sexually explicit content",
    "explicit sexual activity between adults",
    "pornographic photograph",
    "full nudity, naked body",
    "partial nudity, exposed breasts",
    "exposed genitals",
    "erotic photograph",
    "sexually suggestive pose, sexy, hot",
    "adult content, not safe for work",
    "explicit sexual illustration or drawing",
    "explicit sexual anime or cartoon, hentai",
    "erotic lingerie photo shoot",
)
DEFAULT_PROMPT_SETS: dict[str, tuple[str, ...]] = {"neutral": NEUTRAL_PROMPTS, "sexual": SEXUAL_PROMPTS}
DEFAULT_UNSAFE_SETS: tuple[str, ...] = ("sexual",)


def zero_shot_tags(img_emb: np.ndarray, text_emb_of_prompts: np.ndarray, labels: Sequence[str], *,
                   k: int = 2, temperature: float = 100.0) -> tuple[list[tuple[str, ...]], np.ndarray]:
    """Top-k prompt labels per image by softmax(temperature · img · textᵀ) over L2-normalised vectors.

    `labels[j]` is the label of prompt row j (several prompts may share a label). Returns, per image, the
    labels of its k most probable prompts (best first) and their probabilities, [n, k] float32.
    """
    img = np.asarray(img_emb, dtype=np.float32)
    txt = np.asarray(text_emb_of_prompts, dtype=np.float32)
    if txt.ndim != 2 or len(labels) != txt.shape[0]:
        raise ValueError(f"need one label per prompt embedding: {len(labels)} labels, {txt.shape[0]} prompts")
    if not 1 <= k <= txt.shape[0]:
        raise ValueError(f"k must be in [1, {txt.shape[0]}], got {k}")
    if img.shape[0] == 0:
        return [], np.zeros((0, k), np.float32)
    logits = temperature * img @ txt.T
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top_labels = [tuple(labels[j] for j in row) for row in top]
    return top_labels, np.take_along_axis(probs, top, axis=1).astype(np.float32)


def tag_from_top_labels(top: Sequence[str], unsafe_sets: Collection[str]) -> str:
    """LAION-400M's rule on the top-2 labels: all safe -> UNLIKELY, all unsafe -> NSFW, else UNSURE."""
    flags = [label in unsafe_sets for label in top]
    if not any(flags):
        return TAG_UNLIKELY
    return TAG_NSFW if all(flags) else TAG_UNSURE


def nsfw_tags(img_emb: np.ndarray, prompt_sets: Mapping[str, Sequence[str]] | None, model: torch.nn.Module,
              tokenizer: Callable[..., torch.Tensor], *, unsafe_sets: Collection[str] = DEFAULT_UNSAFE_SETS,
              k: int = 2) -> list[str]:
    """LAION-400M-style UNLIKELY/UNSURE/NSFW tag per image embedding, from prompt sets defined by label.

    `prompt_sets` maps a set label to its prompts (None: `DEFAULT_PROMPT_SETS`); every prompt carries its
    set's label, so the decision never depends on prompt positions. Labels in `unsafe_sets` count as
    unsafe (default: "sexual"); any other set (e.g. "neutral") counts as safe. Plug in another concept,
    such as the sample web's "hazard", by passing it as a set and naming it in `unsafe_sets`.
    """
    sets = dict(DEFAULT_PROMPT_SETS if prompt_sets is None else prompt_sets)
    missing = [name for name in unsafe_sets if name not in sets]
    if missing:
        raise ValueError(f"unsafe_sets {missing} are not among the prompt sets {sorted(sets)}")
    if not any(name not in unsafe_sets for name in sets):
        raise ValueError("need at least one safe (e.g. 'neutral') prompt set besides the unsafe ones")
    prompts: list[str] = []
    labels: list[str] = []
    for label, texts in sets.items():
        if isinstance(texts, str) or not texts:
            raise ValueError(f"prompt set {label!r} must be a non-empty list of prompts")
        prompts.extend(texts)
        labels.extend([label] * len(texts))
    prompt_emb = embed_texts(model, tokenizer, prompts)
    top, _ = zero_shot_tags(img_emb, prompt_emb, labels, k=k)
    return [tag_from_top_labels(t, unsafe_sets) for t in top]
