"""Search the index by text or by vector, and join each hit with what the lake knows about it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from curation.clip import embed_texts, load_clip
from curation.index import LoadedIndex, load_index
from curation.models import checkpoint_identity
from curation.scoring import ScoringConfig
from curation.sql import KEPT_VIEW, connect_kept

# Columns returned with every hit, beyond uid and score.
HIT_COLUMNS = ("url", "caption", "crawl", "segment", "similarity", "aesthetic", "punsafe", "pwatermark", "nsfw_tag",
               "original_width", "original_height")


@dataclass(frozen=True)
class Hit:
    uid: int
    score: float
    fields: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"uid": self.uid, "score": round(self.score, 6), **self.fields}


def encode_queries(texts: Sequence[str], spec: Mapping[str, Any], index: LoadedIndex, device: str = "auto"
                   ) -> np.ndarray:
    """Text embeddings from the model in `spec`, refused unless it is the model whose embeddings the index holds."""
    config = ScoringConfig.from_spec(spec, device=device, precision="fp32" if device == "cpu" else "fp16")
    want = (index.manifest.clip_model, index.manifest.clip_checkpoint)
    have = (config.clip.model_name, checkpoint_identity(config.clip.pretrained))
    if have != want:
        raise ValueError(f"the models spec gives {have[0]} {have[1]}, but the index was built from {want[0]} "
                         f"{want[1]} embeddings: pass the spec the clip asset used (--spec)")
    clip = load_clip(config.clip)
    return embed_texts(clip.model, clip.tokenizer, list(texts), precision=clip.precision)


def describe(lake_root: str, uids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The lake's fields (HIT_COLUMNS) for some uids, via DuckDB with the uids bound as a parameter."""
    if not uids:
        return {}
    con, _ = connect_kept(lake_root)
    rows = con.execute(
        f"SELECT uid, {', '.join(HIT_COLUMNS)} FROM {KEPT_VIEW} WHERE uid IN (SELECT UNNEST($uids))",
        {"uids": [int(u) for u in uids]},
    ).fetchall()
    out: dict[int, dict[str, Any]] = {}
    for row in rows:
        out.setdefault(int(row[0]), dict(zip(HIT_COLUMNS, row[1:], strict=True)))
    return out


def search_vectors(lake_root: str, index: LoadedIndex, queries: np.ndarray, k: int) -> list[list[Hit]]:
    """Top-k hits per query vector, each with the lake's fields."""
    scores, ids = index.search(queries, k)
    found = sorted({int(u) for u in ids.ravel() if u != -1})
    fields = describe(lake_root, found)
    return [[Hit(int(u), float(s), fields.get(int(u), {})) for s, u in zip(srow, irow, strict=True) if u != -1]
            for srow, irow in zip(scores, ids, strict=True)]


def search_text(lake_root: str, texts: Sequence[str], spec: Mapping[str, Any], k: int = 10,
                modality: str = "image", device: str = "auto") -> list[list[Hit]]:
    """Top-k hits for each text query (text-to-image search over the image index by default)."""
    index = load_index(lake_root, modality)
    return search_vectors(lake_root, index, encode_queries(texts, spec, index, device), k)
