"""Fixtures shared by the core tests: a tiny random open_clip architecture registered once per module."""

from __future__ import annotations

import json

import open_clip
import pytest

TINY = "curation-test-tiny-clip"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
FP16_TOL = 4e-3  # float16 keeps ~3 decimal digits; unit vectors' components are < 1


@pytest.fixture(scope="module")
def tiny_model_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("model-configs") / f"{TINY}.json"
    path.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(path)  # registered under the file stem
    return TINY
