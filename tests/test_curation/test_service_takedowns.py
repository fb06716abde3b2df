"""Takedowns in the search service, over a copy of the fixture web's lake on a real HTTP server: a uid written to
taken_down.parquet (as an ingest writes it) is gone from search, paging, filters, /metadata, /image, /explain,
/export and saved searches at the very next request, with no index rebuild and no restart; lifted, it comes back."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import blocklist
from curation import records as R
from curation.explain import explain
from curation.io import write_parquet
from curation.search import Generation
from curation.service import ServiceConfig
from curation.subsets import latest_release, read_release
from tests.servers import Server

LIST = "court-order-7"
WHEN = 1_712_345_678.5
PROMPT = "a drawing of a red circle"


@pytest.fixture(scope="module")
def lake(indexed_lake: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the indexed lake: the takedowns and saved searches written here are seen by no other test."""
    copy = tmp_path_factory.mktemp("takedowns") / "lake"
    shutil.copytree(indexed_lake, copy)
    return copy


@pytest.fixture(scope="module")
def server(lake: Path, sample_models: dict[str, Any]) -> Iterator[Server]:
    config = ServiceConfig(lake_root=str(lake), spec=sample_models, device="cpu", rate_per_s=1000, burst=1000)
    with Server(config) as s:
        yield s


def pair(lake: Path, uid: int) -> dict[str, Any]:
    for path in sorted(lake.glob("pairs/crawl=*/segment=*/pairs.parquet")):
        rows = pq.read_table(path, filters=[(R.UID, "==", uid)]).to_pylist()
        if rows:
            return rows[0]
    raise AssertionError(f"uid {uid} is in no pairs partition")


def take_down(lake: Path, uids: list[int]) -> None:
    """taken_down.parquet as an ingest writes it (TAKEN_DOWN_SCHEMA, atomically), holding exactly `uids`."""
    rows = [pair(lake, u) for u in uids]
    write_parquet(pa.table({
        R.UID: uids, R.CRAWL: [r[R.CRAWL] for r in rows], R.SEGMENT: [r[R.SEGMENT] for r in rows],
        blocklist.LIST: [LIST] * len(rows), blocklist.KIND: [blocklist.KIND_URL_SHA256] * len(rows),
        blocklist.URL_SHA256: [blocklist.url_sha256(r[R.URL]) for r in rows],
        blocklist.HOST: [blocklist.url_host(r[R.URL]) for r in rows], blocklist.MATCHED_UNIX: [WHEN] * len(rows),
    }, schema=blocklist.TAKEN_DOWN_SCHEMA), blocklist.taken_down_path(str(lake)))


def lift(lake: Path) -> None:
    Path(blocklist.taken_down_path(str(lake))).unlink(missing_ok=True)


def ids(results: list[dict[str, Any]]) -> list[int]:
    return [r["id"] for r in results]


def test_a_taken_down_uid_leaves_every_endpoint_at_the_next_request(server: Server, lake: Path) -> None:
    before = server.knn(text=PROMPT, num_images=11)
    x, url = before[0]["id"], before[0]["url"]
    crawl = before[0]["crawl"]
    filtered = {"crawl": crawl, "min_original_width": 1}
    filtered_before = server.knn(text=PROMPT, num_images=11, **filtered)
    assert filtered_before[0]["id"] == x and len(filtered_before) == 11
    own = Generation.load(str(lake)).store
    vector = own.embeddings(own.positions([x]))[0].tolist()
    assert server.knn(embedding_input=vector, num_images=5)[0]["id"] == x  # its own image finds it first
    assert server.call(f"/image/{x}")[0] == 200
    assert server.call("/health")[1]["taken_down"] == 0

    take_down(lake, [x])  # no rebuild, no reload, no restart
    try:
        after = server.knn(text=PROMPT, num_images=10)
        assert ids(after) == ids(before[1:11])  # the next ten: still k results
        assert ids(server.knn(text=PROMPT, num_images=10, **filtered)) == ids(filtered_before[1:11])
        paged = server.knn(text=PROMPT, num_images=5, num_result_ids=40)
        assert len(paged) == 40 and x not in ids(paged) and ids(paged[:10]) == ids(before[1:11])
        assert x not in ids(server.knn(text=PROMPT, num_images=10, deduplicate=True))
        nearest = server.knn(embedding_input=vector, num_images=5)
        assert len(nearest) == 5 and x not in ids(nearest)

        status, meta, _ = server.call("/metadata", {"ids": [x, str(before[1]["id"])], "indice_name": "curation"})
        assert status == 200 and meta[0] == {"id": x, "metadata": {}}
        assert meta[1]["metadata"]["url"] == before[1]["url"]

        status, body, headers = server.call(f"/image/{x}")
        assert status == 410 and headers["content-type"] == "application/json"
        assert body == {"error": f"uid {x} was taken down by the takedown list '{LIST}'", "status": "taken_down",
                        "list": LIST}
        assert "x-original-url" not in {k.lower() for k in headers}

        status, body, _ = server.call(f"/explain/{x}")
        assert status == 200
        assert body == {"uid": x, "uid_str": str(x), "status": "taken_down", "list": LIST, "taken_down_unix": WHEN}
        assert explain(str(lake), url) == {"url_sha256": blocklist.url_sha256(url), "status": "taken_down",
                                           "list": LIST, "taken_down_unix": WHEN}

        status, exported, headers = server.call("/export", {"text": PROMPT, "num_images": 10, "format": "json"})
        assert status == 200 and headers["x-result-rows"] == "10"
        assert [r["uid"] for r in exported] == ids(before[1:11]) and url not in json.dumps(exported)

        status, saved, _ = server.call("/subsets", {"name": "circles_after_takedown", "query": {"text": PROMPT},
                                                    "top_k": 5})
        assert status == 201, saved
        release = latest_release(str(lake), "circles_after_takedown")
        assert release is not None
        released = read_release(str(lake), "circles_after_takedown", release).column(R.UID).to_pylist()
        assert sorted(released) == sorted(ids(before[1:6]))

        assert server.call("/health")[1]["taken_down"] == 1
        metrics = server.call("/metrics")[1].decode()
        assert "curation_taken_down_uids 1\n" in metrics and "curation_taken_down_in_index_image 1\n" in metrics
    finally:
        lift(lake)

    assert ids(server.knn(text=PROMPT, num_images=11)) == ids(before)  # lifted: the same results as before
    assert server.call(f"/image/{x}")[0] == 200
    status, meta, _ = server.call("/metadata", {"ids": [x], "indice_name": "curation"})
    assert meta[0]["metadata"]["url"] == url
    assert server.call(f"/explain/{x}")[1]["url"] == url
    assert server.call("/health")[1]["taken_down"] == 0


def test_a_taken_down_survivor_is_not_named_by_its_duplicates(lake: Path) -> None:
    losers = [r for p in sorted(lake.glob("dedupe/crawl=*/segment=*/*.parquet")) for r in pq.read_table(p).to_pylist()
              if not r[R.SURVIVOR] and r[R.CLUSTER_ID] is not None]
    assert losers, "the fixture web plants exact copies: dedupe must have merged some"
    loser, survivor = losers[0][R.UID], losers[0][R.CLUSTER_ID]
    survivor_url = pair(lake, survivor)[R.URL]
    assert explain(str(lake), loser)["dedupe"]["survivor_url"] == survivor_url
    take_down(lake, [survivor])
    try:
        shown = explain(str(lake), loser)
        assert shown["url"] == pair(lake, loser)[R.URL]  # the duplicate itself was not taken down
        assert shown["dedupe"]["survivor_taken_down"] == LIST and shown["dedupe"]["survivor_uid"] == survivor
        assert not {"survivor_url", "survivor_caption", "survivor_crawl"} & set(shown["dedupe"])
        if survivor_url != shown["url"]:
            assert survivor_url not in json.dumps(shown)
    finally:
        lift(lake)
