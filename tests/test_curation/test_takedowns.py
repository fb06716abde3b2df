"""Takedowns against the fixture web's truth: a list of image sha256s, pHashes of originals with planted re-encoded
copies, and one host is ingested, matched and propagated; nothing listed remains in the index, search, releases or
shard bytes, nothing else is removed, and a re-crawl brings none back."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow.parquet as pq
import pytest

from curation import blocklist as B
from curation import records as R
from curation import takedowns as T
from curation.index import index_ids
from curation.integrity import verify_partition_counts
from curation.layout import Partition
from curation.scoring import verify_clip_partition
from curation.subsets import latest_release, load_registry, read_release, release_history
from curation.takedowns import ingest, propagate, verify_takedowns
from tests.conftest import SampleWeb

LIST = "hotline"
HOST = "127.0.0.2"
PHASH_RADIUS = 6  # the dedupe default: links 98 % of planted copies and no distinct pair (curation.dedupe)
REGISTRY = {"subsets": [{"name": "everything", "description": "every survivor, re-sharded",
                         "conditions": {"any": "true"}, "webdataset": True, "shard_size": 50}]}


def _table(lake: Path, stage: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for path in sorted((lake / stage).glob("crawl=*/segment=*/" + f"{stage}.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def _tar_uids(paths: list[Path]) -> set[int]:
    out: set[int] = set()
    for path in paths:
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    f = tar.extractfile(m)
                    assert f is not None
                    uid = json.loads(f.read()).get("uid")
                    if uid is not None:
                        out.add(int(uid))
    return out


def _shard_uids(lake: Path) -> set[int]:
    return _tar_uids(sorted(lake.glob("downloads/crawl=*/segment=*/shards/*.tar")))


def _release_uids(lake: Path, name: str, release: dict[str, Any]) -> set[int]:
    return set(read_release(str(lake), name, release).column(R.UID).to_pylist())


@pytest.fixture(scope="module")
def world(indexed_lake: Path, sample_web: SampleWeb, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A copy of the indexed fixture lake with every subset exported, the list built from truth, and what
    truth says it must take down."""
    from curation.subsets import export_subset

    root = tmp_path_factory.mktemp("takedowns")
    lake = root / "lake"
    shutil.copytree(indexed_lake, lake)
    registry = root / "subsets.json"
    registry.write_text(json.dumps(REGISTRY))
    for defn in load_registry(str(registry), str(lake)):
        export_subset(str(lake), defn)

    truth = [t for t in sample_web.truth() if t.get("sha256")]
    pairs = {r[R.URL]: r[R.UID] for r in _table(lake, "pairs")}
    downloads = {r[R.UID]: r for r in _table(lake, "downloads")}
    ok = [t for t in truth if downloads.get(pairs.get(t["url"]), {}).get(R.STATUS) == R.STATUS_SUCCESS]
    indexed = set(index_ids(str(lake)).column(R.UID).to_pylist())

    # 1. three exact images by their bytes' sha256 (no planted duplicate group: plain images)
    plain = sorted({t["sha256"] for t in ok if t["dup_group"] is None and pairs[t["url"]] in indexed})
    by_sha = plain[:3]
    # 2. two originals by pHash whose re-encoded copies (other bytes) are in the lake
    groups = sorted({t["dup_group"] for t in ok if t["dup_kind"] in ("reencoded", "recompressed")
                     and urlsplit(t["url"]).hostname != HOST})
    originals = {t["dup_group"]: t for t in truth if t["dup_kind"] == "original" and t["dup_group"] in groups
                 and t.get("phash")}
    chosen = [g for g in groups if g in originals][:2]
    lines = [f"image_sha256 {s}" for s in by_sha]
    lines += [f"phash {originals[g]['phash']} radius={PHASH_RADIUS}" for g in chosen]
    lines.append(f"host {HOST}")
    # what truth says the list matches: every row with a listed sha256, every member of a listed pHash's group
    # except crops (a crop is a different picture), every image on the host
    expected_sha = {pairs[t["url"]] for t in truth if t["sha256"] in by_sha and t["url"] in pairs}
    expected_phash = {pairs[t["url"]] for t in truth if t["dup_group"] in chosen and t["dup_kind"] != "cropped"
                      and t["url"] in pairs and downloads[pairs[t["url"]]][R.STATUS] == R.STATUS_SUCCESS}
    on_host = {uid for url, uid in pairs.items() if urlsplit(url).hostname == HOST
               or urlsplit(downloads[uid][R.FINAL_URL] or "").hostname == HOST}
    return {"lake": lake, "registry": str(registry), "list": "\n".join(lines).encode(), "pairs": pairs,
            "downloads": downloads, "indexed": indexed, "expected": expected_sha | expected_phash | on_host,
            "expected_by": {"image_sha256": expected_sha, "phash": expected_phash, "host": on_host},
            "reencoded": {pairs[t["url"]] for t in truth if t["dup_group"] in chosen
                          and t["dup_kind"] in ("reencoded", "recompressed") and t["url"] in pairs},
            "releases": {d.name: (rel, _release_uids(lake, d.name, rel))
                         for d in load_registry(str(registry), str(lake))
                         if (rel := latest_release(str(lake), d.name)) is not None},
            "shard_uids": _shard_uids(lake)}


@pytest.fixture(scope="module")
def propagated(world: dict[str, Any]) -> dict[str, Any]:
    lake = str(world["lake"])
    ingested = ingest(lake, world["list"], name=LIST, reason="fixture hotline report", source="hotline.txt")
    taken = set(B.taken_down(lake).column(R.UID).to_pylist())  # before any propagation
    result = propagate(lake, world["registry"])
    return {"ingested": ingested, "taken_at_ingest": taken, "result": result}


def test_the_list_matches_exactly_what_truth_says(world: dict[str, Any], propagated: dict[str, Any]) -> None:
    expected, taken = world["expected"], propagated["taken_at_ingest"]
    assert world["expected_by"]["image_sha256"] and world["expected_by"]["phash"] and world["expected_by"]["host"]
    collateral = taken - expected
    missed = expected - taken
    assert not collateral, f"{len(collateral)} rows removed that the list does not name"
    assert not missed, f"{len(missed)} listed rows not matched"
    assert world["reencoded"] <= taken  # the re-encoded copies (other bytes, same picture) were found by pHash
    kinds = propagated["ingested"].matched
    assert sum(kinds.values()) == len(expected) and set(kinds) <= {"image_sha256", "phash", "host"}
    print(f"takedown truth: {len(expected)} expected ({ {k: len(v) for k, v in world['expected_by'].items()} }), "
          f"matched {kinds}, re-encoded copies {len(world['reencoded'])}, collateral {len(collateral)}, "
          f"missed {len(missed)}, lake rows {len(world['pairs'])}")


def test_nothing_listed_remains_anywhere(world: dict[str, Any], propagated: dict[str, Any]) -> None:
    lake, expected = world["lake"], world["expected"]
    assert verify_takedowns(str(lake)) == []
    assert not set(index_ids(str(lake)).column(R.UID).to_pylist()) & expected
    assert not _shard_uids(lake) & expected
    for path in lake.glob("subsets/*/release-*/shards/*.tar"):
        assert not _tar_uids([path]) & expected, path
    for defn in load_registry(world["registry"], str(lake)):
        for release in release_history(str(lake), defn.name):
            assert not _release_uids(lake, defn.name, release) & expected, (defn.name, release["release"])
    for stage in ("pairs", "downloads", "clip"):
        for row in _table(lake, stage):
            if row[R.UID] in expected:
                assert row.get(R.URL) is None and row.get(R.TEXT) is None and row.get(R.FINAL_URL) is None
                assert row.get(R.SHA256) is None and row.get(R.SIMILARITY) is None and row.get(R.PHASH) is None
                if stage != "pairs":
                    assert (row[R.STATUS], row[R.REASON]) == (R.STATUS_TAKEN_DOWN, f"takedown:{LIST}")
    for emb_dir in lake.glob("clip/crawl=*/segment=*/embeddings"):
        uids = np.load(emb_dir / "uids.npy")
        hit = np.isin(uids, np.fromiter(expected, np.int64))
        assert not np.load(emb_dir / "img_emb.npy")[hit].any() and not np.load(emb_dir / "text_emb.npy")[hit].any()


def test_nothing_else_is_removed(world: dict[str, Any], propagated: dict[str, Any]) -> None:
    lake, expected = world["lake"], world["expected"]
    now_indexed = set(index_ids(str(lake)).column(R.UID).to_pylist())
    assert world["indexed"] - now_indexed == world["indexed"] & expected
    assert _shard_uids(lake) == world["shard_uids"] - expected
    taken_rows = [r for r in _table(lake, "downloads") if r[R.STATUS] == R.STATUS_TAKEN_DOWN]
    assert {r[R.UID] for r in taken_rows} == expected & set(world["downloads"])
    parts = [Partition.from_key(k) for k in {f"{r[R.CRAWL]}|{r[R.SEGMENT]}" for r in _table(lake, "pairs")}]
    assert verify_partition_counts(str(lake), parts) == []
    for part in parts:
        assert verify_clip_partition(str(lake), part) == []


def test_every_subset_holding_a_hit_has_a_new_release_saying_takedown(world: dict[str, Any],
                                                                     propagated: dict[str, Any]) -> None:
    lake, expected = world["lake"], world["expected"]
    hit = {name: (rel, uids & expected) for name, (rel, uids) in world["releases"].items() if uids & expected}
    assert "everything" in hit
    assert set(propagated["result"].subsets) == set(hit)
    for name, (before, removed) in hit.items():
        after = latest_release(str(lake), name)
        assert after is not None and after["release"] == before["release"] + 1
        assert after["diff"]["removed"] == len(removed)
        assert after["diff"]["removed_by_reason"] == {f"takedown:{LIST}": len(removed)}
        scrubbed = next(r for r in release_history(str(lake), name) if r["release"] == before["release"])
        assert scrubbed["rows"] == before["rows"] - len(removed)
        assert scrubbed["takedowns"][0]["removed_rows"] == len(removed)


def test_propagation_is_idempotent_and_reported(world: dict[str, Any], propagated: dict[str, Any]) -> None:
    lake = str(world["lake"])
    again = propagate(lake, world["registry"])
    assert not again.scrub.partitions and again.index_removed == 0 and not again.subsets
    report = T.report(lake)
    (entry,) = report["lists"]
    assert entry["propagated"] and entry["rows"] == len(world["expected"])
    assert entry["entries_by_kind"] == {"host": 1, "image_sha256": 3, "phash": 2}
    assert entry["ingest_to_propagated_s"] is not None and entry["ingest_to_propagated_s"] >= 0
    assert ingest(lake, world["list"], name=LIST, reason="again", source="hotline.txt").new is False


def test_a_recrawl_brings_none_back(world: dict[str, Any], propagated: dict[str, Any], sample_web: SampleWeb,
                                    sample_server: Any, sample_models: dict[str, Any]) -> None:
    from curation.dedupe import DedupeConfig
    from curation.index import IndexConfig
    from curation.stages import (
        materialize_clip,
        materialize_dedupe,
        materialize_downloads,
        materialize_index,
        materialize_pairs,
    )

    lake, expected = str(world["lake"]), world["expected"]
    for part in [Partition.from_key(k) for k in sorted({f"{r[R.CRAWL]}|{r[R.SEGMENT]}"
                                                        for r in _table(world["lake"], "pairs")})]:
        materialize_pairs(lake, str(sample_web.root), part)
        materialize_downloads(lake, part, {"allow_loopback": True, "processes": 1, "threads": 16})
        materialize_clip(lake, part, sample_models, {"device": "cpu", "precision": "fp32", "num_workers": 2,
                                                      "batch_size": 64})
    materialize_dedupe(lake, DedupeConfig(radius=0))
    materialize_index(lake, IndexConfig())
    listed_urls = {url for url, uid in world["pairs"].items() if uid in expected}
    pairs = _table(world["lake"], "pairs")
    assert not {r[R.URL] for r in pairs} & listed_urls  # never extracted again, so never fetched
    assert not {r[R.UID] for r in pairs} & expected
    assert not _shard_uids(world["lake"]) & expected
    assert not set(index_ids(lake).column(R.UID).to_pylist()) & expected
    kept = {r[R.UID] for r in pairs}
    assert kept == set(world["pairs"].values()) - expected  # the rest came back unchanged
