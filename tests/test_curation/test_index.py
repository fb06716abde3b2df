"""curation.index on hand-built lakes: index choice, recall, incremental growth, removal and rebuilds."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from curation import records as R
from curation.index import (
    IndexConfig,
    build_index,
    choose_index,
    exact_top_k,
    index_ids,
    ivf_lists,
    load_index,
    recall_at_k,
    verify_index,
)
from curation.layout import Partition
from curation.sample.lake import write_partition as lake_partition

DIM = 32
CRAWL = "CC-MAIN-2030-01"


def clustered(n: int, seed: int, centres: int = 40) -> np.ndarray:
    """Unit vectors around random centres, like CLIP embeddings of a few concepts."""
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(99).normal(size=(centres, DIM))
    x = c[rng.integers(0, centres, n)] + 0.35 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_partition(lake: Path, segment: str, uids: np.ndarray, vectors: np.ndarray, survivor: np.ndarray,
                    model: tuple[str, str] = ("toy", "sha256:aa")) -> Partition:
    """A finished partition of every stage around these vectors (curation.sample.lake)."""
    part = Partition(CRAWL, segment)
    lake_partition(str(lake), part, uids, vectors, survivor=survivor, model=model)
    return part


def uids_for(segment: int, n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.int64) * 7919 + segment * 10_000_019) * (-1) ** segment


CONFIG = IndexConfig(flat_max_vectors=1000, eval_queries=200, batch_size=500)


def test_choose_index_follows_count_and_budget() -> None:
    assert choose_index(500, 512, IndexConfig()).family == "flat"
    plan = choose_index(1_000_000, 512, IndexConfig(memory_budget_bytes=4 << 30))
    assert plan.family == "ivf_flat" and plan.factory == "IVF2048,Flat" and plan.nlist == ivf_lists(1_000_000)
    assert choose_index(20_000_000, 512, IndexConfig(memory_budget_bytes=64 << 30)).factory == "IVF8192_HNSW32,Flat"
    assert choose_index(100_000_000, 512, IndexConfig(memory_budget_bytes=256 << 30)).factory == "IVF16384_HNSW32,Flat"
    assert choose_index(100_000_000, 512, IndexConfig(memory_budget_bytes=64 << 30)).factory == (
        "OPQ256_768,IVF16384_HNSW32,PQ256x8")
    pq_plan = choose_index(1_000_000, 512, IndexConfig(memory_budget_bytes=200 << 20))
    assert pq_plan.family == "ivf_pq" and pq_plan.estimated_bytes <= 200 << 20
    assert pq_plan.factory.startswith(f"OPQ{pq_plan.pq_m}_") and f"PQ{pq_plan.pq_m}x8" in pq_plan.factory
    with pytest.raises(ValueError, match="raise the memory budget"):
        choose_index(1_000_000, 512, IndexConfig(memory_budget_bytes=4 << 20))
    with pytest.raises(ValueError, match="raise the budget"):
        choose_index(1000, 512, IndexConfig(memory_budget_bytes=1 << 20))


def test_exact_top_k_streams_like_brute_force() -> None:
    x = clustered(700, 1)
    q = clustered(20, 2)
    ids = np.arange(700, dtype=np.int64) + 1000
    _, got = exact_top_k(q, ((ids[i:i + 64], x[i:i + 64]) for i in range(0, 700, 64)), 10)
    want = ids[np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]]
    assert recall_at_k(got, want) == 1.0


def test_flat_index_is_exact_and_answers_uids(tmp_path: Path) -> None:
    x = clustered(600, 3)
    uids = uids_for(0, 600)
    write_partition(tmp_path, "000", uids, x, np.ones(600, bool))
    r = build_index(str(tmp_path), CONFIG)
    assert (r.family, r.vectors, r.recall_at_k, r.rebuilt) == ("flat", 600, 1.0, True)
    scores, found = load_index(str(tmp_path)).search(x[:5], 3)
    assert found[:, 0].tolist() == uids[:5].tolist()
    assert np.allclose(scores[:, 0], 1.0, atol=2e-3)  # float16 storage
    assert verify_index(str(tmp_path)) == []


def test_ivf_index_is_tuned_to_the_recall_target(tmp_path: Path) -> None:
    for seg in range(3):
        write_partition(tmp_path, f"{seg:03d}", uids_for(seg, 1500), clustered(1500, 10 + seg), np.ones(1500, bool))
    r = build_index(str(tmp_path), CONFIG)
    assert r.family == "ivf_flat" and r.vectors == 4500
    assert r.recall_at_k >= 0.95 and r.nprobe >= 1
    assert list(r.recall_by_nprobe)[-1] == str(r.nprobe)
    # The recorded recall is real: recompute it independently with exact search over everything.
    x = np.concatenate([clustered(1500, 10 + s) for s in range(3)]).astype(np.float16).astype(np.float32)
    ids = np.concatenate([uids_for(s, 1500) for s in range(3)])
    q = x[::45]
    truth = ids[np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :10]]
    _, found = load_index(str(tmp_path)).search(q, 10)
    assert recall_at_k(found, truth) >= 0.93
    assert verify_index(str(tmp_path)) == []


def test_incremental_update_equals_one_shot_and_rerun_is_a_no_op(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for lake in (a, b):
        write_partition(lake, "000", uids_for(0, 1100), clustered(1100, 20), np.ones(1100, bool))
    first = build_index(str(a), CONFIG)
    write_partition(a, "001", uids_for(1, 800), clustered(800, 21), np.ones(800, bool))
    grown = build_index(str(a), CONFIG)
    assert (grown.rebuilt, grown.added, grown.removed, grown.partitions_changed) == (
        False, 800, 0, [f"{CRAWL}|001"])
    assert grown.factory == first.factory and grown.generation == 2
    write_partition(b, "001", uids_for(1, 800), clustered(800, 21), np.ones(800, bool))
    build_index(str(b), CONFIG)
    assert sorted(index_ids(str(a)).column(R.UID).to_pylist()) == sorted(index_ids(str(b)).column(R.UID).to_pylist())
    again = build_index(str(a), CONFIG)
    assert again.unchanged and again.generation == 2
    assert sorted(p.name for p in (a / "index/image").iterdir()) == [
        "aesthetic-000002.npy", "ids-000002.parquet", "index-000002.faiss", "manifest.json", "meta-000002.arrow"]


def test_survivors_that_change_or_vanish_leave_the_index(tmp_path: Path) -> None:
    x0, x1 = clustered(1500, 30), clustered(1500, 31)
    write_partition(tmp_path, "000", uids_for(0, 1500), x0, np.ones(1500, bool))
    write_partition(tmp_path, "001", uids_for(1, 1500), x1, np.ones(1500, bool))
    build_index(str(tmp_path), CONFIG)
    survivor = np.ones(1500, bool)
    survivor[:100] = False  # a later crawl brought better copies of these
    write_partition(tmp_path, "000", uids_for(0, 1500), x0, survivor)
    r = build_index(str(tmp_path), CONFIG)
    assert (r.rebuilt, r.removed, r.added, r.rewritten, r.vectors) == (False, 100, 0, 1400, 2900), r.rebuild_reason
    _, found = load_index(str(tmp_path)).search(x0[:100], 1)
    assert not set(found[:, 0].tolist()) & set(uids_for(0, 1500)[:100].tolist())
    assert verify_index(str(tmp_path)) == []
    for f in (tmp_path / "dedupe" / f"crawl={CRAWL}" / "segment=001").iterdir():
        f.unlink()
    r = build_index(str(tmp_path), CONFIG)
    assert (r.removed, r.added, r.vectors) == (1500, 0, 1400)


def test_growth_past_the_chosen_type_retrains(tmp_path: Path) -> None:
    write_partition(tmp_path, "000", uids_for(0, 800), clustered(800, 40), np.ones(800, bool))
    assert build_index(str(tmp_path), CONFIG).family == "flat"
    write_partition(tmp_path, "001", uids_for(1, 2500), clustered(2500, 41), np.ones(2500, bool))
    r = build_index(str(tmp_path), CONFIG)
    assert r.rebuilt and r.family == "ivf_flat" and "no longer fits" in r.rebuild_reason
    assert r.vectors == 3300 and verify_index(str(tmp_path)) == []


def test_mixed_models_are_refused_and_a_new_model_rebuilds(tmp_path: Path) -> None:
    write_partition(tmp_path, "000", uids_for(0, 300), clustered(300, 50), np.ones(300, bool))
    write_partition(tmp_path, "001", uids_for(1, 300), clustered(300, 51), np.ones(300, bool), ("toy", "sha256:bb"))
    with pytest.raises(ValueError, match="different models"):
        build_index(str(tmp_path), CONFIG)
    write_partition(tmp_path, "001", uids_for(1, 300), clustered(300, 51), np.ones(300, bool))
    build_index(str(tmp_path), CONFIG)
    for seg in ("000", "001"):
        write_partition(tmp_path, seg, uids_for(int(seg), 300), clustered(300, 52 + int(seg)), np.ones(300, bool),
                        ("toy", "sha256:cc"))
    r = build_index(str(tmp_path), CONFIG)
    assert r.rebuilt and r.rebuild_reason.startswith("model changed")


def test_verify_index_notices_a_stale_index(tmp_path: Path) -> None:
    write_partition(tmp_path, "000", uids_for(0, 300), clustered(300, 60), np.ones(300, bool))
    build_index(str(tmp_path), CONFIG)
    write_partition(tmp_path, "001", uids_for(1, 300), clustered(300, 61), np.ones(300, bool))
    assert any("behind the lake" in p for p in verify_index(str(tmp_path)))
    manifest = json.loads((tmp_path / "index/image/manifest.json").read_text())
    assert faiss.read_index(str(tmp_path / "index/image" / manifest["index_file"])).ntotal == 300


def test_nothing_to_index_is_an_actionable_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="materialize clip and dedupe first"):
        build_index(str(tmp_path), CONFIG)
    with pytest.raises(FileNotFoundError, match="curation index build"):
        load_index(str(tmp_path))
