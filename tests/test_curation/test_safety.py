"""Safety tags: LAION-400M's zero-shot NSFW rule over labelled prompt sets, with stand-in towers and a real one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curation.clip import ClipPassConfig, LoadedClip, load_clip
from curation.safety import DEFAULT_PROMPT_SETS, TAG_NSFW, TAG_UNLIKELY, TAG_UNSURE, nsfw_tags, zero_shot_tags


@pytest.fixture(scope="module")
def tiny_clip(tiny_model_name: str) -> LoadedClip:
    return load_clip(ClipPassConfig(model_name=tiny_model_name, pretrained=None, device="cpu", precision="fp32",
                                    threshold_en=0.0, threshold_other=0.0))


class FakeTokenizer:
    """Maps each prompt to its row in a hand-built embedding table."""

    def __init__(self, vocab: list[str]) -> None:
        self.index = {text: i for i, text in enumerate(vocab)}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[self.index[t]] for t in texts], dtype=torch.int64)


class FakeTextTower(torch.nn.Module):
    def __init__(self, table: np.ndarray) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.from_numpy(table.astype(np.float32)), requires_grad=False)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens[:, 0]]


def unit(*components: float) -> np.ndarray:
    v = np.array(components, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_nsfw_tags_by_label_not_index() -> None:
    # Axes 0-1 are neutral prompts, axes 2-3 hazard prompts; hazard comes FIRST, so a rule that called the
    # first prompts neutral (LAION's `< 19` index test) would get every case below wrong.
    prompt_sets = {"hazard": ["hazard stripes", "warning sign"], "neutral": ["a drawing", "a photo", "a toy"]}
    vectors = {"hazard stripes": unit(0, 0, 1, 0), "warning sign": unit(0, 0, 0, 1),
               "a drawing": unit(1, 0, 0, 0), "a photo": unit(0, 1, 0, 0), "a toy": unit(-1, -1, -1, -1)}
    vocab = list(vectors)
    model = FakeTextTower(np.stack([vectors[t] for t in vocab]))
    tokenizer = FakeTokenizer(vocab)
    images = np.stack([unit(1, 1, 0, 0), unit(0, 0, 1, 1), unit(1, 0, 1, 0), unit(0, 1, 0, 0.9)])
    tags = nsfw_tags(images, prompt_sets, model, tokenizer, unsafe_sets=("hazard",))
    assert tags == [TAG_UNLIKELY, TAG_NSFW, TAG_UNSURE, TAG_UNSURE]
    # The same sets with nothing declared unsafe... is refused; declaring neutral unsafe flips the tags.
    with pytest.raises(ValueError, match="not among the prompt sets"):
        nsfw_tags(images, prompt_sets, model, tokenizer, unsafe_sets=("sexual",))
    flipped = nsfw_tags(images, prompt_sets, model, tokenizer, unsafe_sets=("neutral",))
    assert flipped == [TAG_NSFW, TAG_UNLIKELY, TAG_UNSURE, TAG_UNSURE]


def test_zero_shot_tags_softmax_top_k() -> None:
    prompts = np.stack([unit(1, 0), unit(0, 1), unit(1, 1)])
    labels, probs = zero_shot_tags(np.stack([unit(1, 0.1)]), prompts, ["a", "b", "c"], k=2)
    assert labels == [("a", "c")]
    logits = 100 * prompts @ unit(1, 0.1)
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(probs[0], expected[[0, 2]], rtol=1e-5)
    with pytest.raises(ValueError, match="one label per prompt"):
        zero_shot_tags(np.stack([unit(1, 0)]), prompts, ["a", "b"])


def test_default_prompt_sets_are_labelled() -> None:
    assert len(DEFAULT_PROMPT_SETS["neutral"]) == 19
    assert DEFAULT_PROMPT_SETS["sexual"] and not set(DEFAULT_PROMPT_SETS["neutral"]) & set(
        DEFAULT_PROMPT_SETS["sexual"])


def test_nsfw_tags_with_a_real_tokenizer(tiny_clip: LoadedClip) -> None:
    img = np.random.default_rng(0).normal(size=(3, 32)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    tags = nsfw_tags(img, None, tiny_clip.model, tiny_clip.tokenizer)
    assert len(tags) == 3 and set(tags) <= {TAG_UNLIKELY, TAG_UNSURE, TAG_NSFW}
