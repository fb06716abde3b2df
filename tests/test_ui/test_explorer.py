"""The explorer (`curation serve`'s page at `/`) in a headless Chromium over the fixture web's lake, against the web's
ground truth: a text query shows images of its concept, page by page; safe mode is on by default and a filter holds
for every shown result; "more like this", "search this caption", an uploaded image and an image URL re-query; the
provenance panel shows a result's WAT record and dedupe decision; export downloads the shown results as a file
img2dataset reads; save-as-subset publishes a release that then filters searches; and the page works against a
service that wants a bearer token.

Screenshots are kept under $CURATION_TEST_ARTIFACTS/ui (default .data/test-artifacts/ui).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from img2dataset.reader import Reader

from curation import blocklist
from curation import records as R
from curation.io import write_parquet
from curation.netguard import NetPolicy
from curation.sample.server import SampleWebServer
from curation.service import ServiceConfig
from curation.subsets import latest_release, read_release
from tests.browser import Browser, browser, chromium_path
from tests.conftest import SampleWeb
from tests.servers import Server

pytestmark = pytest.mark.ui
TOKEN = "test-token-0123456789abcdef"
RED_CIRCLE = "a drawing of a red circle"
HAZARD = "black and yellow hazard stripes"
CARDS_JS = "Array.from(document.querySelectorAll('#grid .card')).map(c => ({...c.dataset}))"
LOADED_JS = ("(() => { const imgs = Array.from(document.querySelectorAll('#grid .card img'));"
             " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); })()")


def artifacts() -> Path:
    out = Path(os.environ.get("CURATION_TEST_ARTIFACTS", ".data/test-artifacts")) / "ui"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def truth(indexed_lake: Path, sample_web: SampleWeb) -> dict[str, dict[str, Any]]:
    """uid (as the page holds it: a string) -> the sample web's truth row of its image URL."""
    by_url = {r["url"]: r for r in sample_web.truth()}
    out = {}
    for path in sorted(indexed_lake.glob("pairs/crawl=*/segment=*/pairs.parquet")):
        for row in pq.read_table(path, columns=[R.UID, R.URL]).to_pylist():
            out[str(row[R.UID])] = by_url[row[R.URL]]
    return out


def _config(lake: Path, spec: dict[str, Any], **overrides: Any) -> ServiceConfig:
    """The service as the tests run it: CPU towers, no rate limit in the way, image URLs on the loopback sample web."""
    return ServiceConfig(lake_root=str(lake), spec=spec, device="cpu", rate_per_s=1000, burst=1000,
                         url_policy=NetPolicy.with_loopback(), **overrides)


@pytest.fixture(scope="module")
def server(indexed_lake: Path, sample_models: dict[str, Any], sample_server: SampleWebServer) -> Iterator[Server]:
    with Server(_config(indexed_lake, sample_models)) as s:
        yield s


@pytest.fixture(scope="module")
def page() -> Iterator[Browser]:
    chromium_path()
    with browser((1400, 1000)) as b:
        yield b


def searches(page: Browser) -> int:
    return int(page.evaluate("Number(document.body.dataset.searches || 0)"))


def wait_search(page: Browser, before: int) -> list[dict[str, str]]:
    """Wait for the search after `before` completed ones, and for its thumbnails; the shown cards' data."""
    page.wait_for(f"Number(document.body.dataset.searches || 0) > {before}", 120)
    if page.evaluate("document.querySelectorAll('#grid .card').length"):
        page.wait_for(LOADED_JS, 60)
    return list(page.evaluate(CARDS_JS))


def open_query(page: Browser, server: Server, text: str) -> list[dict[str, str]]:
    page.goto(f"{server.url}/?{urllib.parse.urlencode({'q': text})}")
    page.wait_for("document.readyState === 'complete' && !!document.querySelector('#grid')")
    return wait_search(page, 0)


def act(page: Browser, script: str) -> list[dict[str, str]]:
    """Run `script` (which starts a search) and return the cards of that search."""
    before = searches(page)
    page.evaluate(script)
    return wait_search(page, before)


def test_text_query_shows_the_concept_page_by_page(page: Browser, server: Server,
                                                   truth: dict[str, dict[str, Any]]) -> None:
    cards = open_query(page, server, RED_CIRCLE)
    shot = page.screenshot(artifacts() / "explorer-red-circle.png")
    assert len(cards) == 40 and page.evaluate("document.querySelector('#q').value") == RED_CIRCLE
    assert shot.stat().st_size > 50_000
    top = [truth[c["uid"]]["concept"] or "" for c in cards[:10]]
    # as for clip-front (tests/test_ui/test_clip_front.py): the query's colour, with the toy CLIP's shape confusion
    assert sum(c.startswith("red ") for c in top) >= 8, top
    assert top.count("red circle") >= 3, top
    assert all(c["url"] == truth[c["uid"]]["url"] for c in cards)
    similarity = [float(c["similarity"]) for c in cards]
    assert similarity == sorted(similarity, reverse=True)
    # 120 asked for; near-duplicates hidden (on by default) leave fewer, shown 40 a page
    total = int(page.evaluate("document.querySelector('#status').textContent").split()[0])
    assert 80 < total <= 120
    assert page.evaluate("document.querySelectorAll('#pager .page').length") == -(-total // 40)
    # the next page: the following 40, no repeats, still in rank order
    page.evaluate("document.querySelector('#pager .next').click()")
    page.wait_for(LOADED_JS)
    second = page.evaluate(CARDS_JS)
    assert len(second) == 40 and not {c["uid"] for c in second} & {c["uid"] for c in cards}
    assert float(second[0]["similarity"]) <= similarity[-1]
    assert page.evaluate("document.querySelector('#pager .current').textContent") == "2"
    page.screenshot(artifacts() / "explorer-red-circle-page-2.png")


def uncheck(name: str) -> str:
    """A script that unticks the filter panel's checkbox `name` as a user would (a change event)."""
    return (f"(() => {{ const box = document.querySelector('#filters').elements.{name}; box.checked = false;"
            " box.dispatchEvent(new Event('change', {bubbles: true})); })()")


def test_safe_mode_is_on_by_default_and_filters_hold(page: Browser, server: Server,
                                                     truth: dict[str, dict[str, Any]]) -> None:
    safe = open_query(page, server, HAZARD)
    assert page.evaluate("document.querySelector('#filters').elements.safe.checked") is True
    assert safe and not any(truth[c["uid"]]["unsafe"] for c in safe)
    unsafe = act(page, uncheck("safe"))
    assert sum(truth[c["uid"]]["unsafe"] for c in unsafe) == 1  # the unsafe stand-ins are near-duplicates: one shown
    unsafe = act(page, uncheck("deduplicate"))
    assert sum(truth[c["uid"]]["unsafe"] for c in unsafe[:20]) >= 5  # all of them now
    floor = sorted(float(c["aesthetic"]) for c in unsafe)[len(unsafe) // 2]
    filtered = act(page, f"(() => {{ const f = document.querySelector('#filters').elements.min_aesthetic;"
                         f" f.value = '{floor}'; f.dispatchEvent(new Event('change', {{bubbles: true}})); }})()")
    page.screenshot(artifacts() / "explorer-filtered.png")
    assert filtered and all(float(c["aesthetic"]) >= floor for c in filtered)
    assert [c["uid"] for c in filtered] != [c["uid"] for c in unsafe]  # the grid changed
    shown = page.evaluate("Array.from(document.querySelectorAll('#grid .score-aes')).map(e => e.textContent)")
    assert all(float(text) >= round(floor, 2) - 0.005 for text in shown)  # what the reader sees, too


def test_more_like_this_and_search_this_caption(page: Browser, server: Server) -> None:
    cards = open_query(page, server, RED_CIRCLE)
    like = act(page, "document.querySelectorAll('#grid .card')[3].querySelector('button.like').click()")
    assert like[0]["uid"] == cards[3]["uid"]  # the image finds itself first
    assert float(like[0]["similarity"]) == pytest.approx(1.0, abs=0.02)
    caption = page.evaluate("document.querySelectorAll('#grid .card')[5].querySelector('.caption').textContent")
    again = act(page, "document.querySelectorAll('#grid .card')[5].querySelector('button.caption-search').click()")
    assert page.evaluate("document.querySelector('#q').value") == caption and again
    assert caption in page.evaluate("document.querySelector('#status').textContent")


def test_image_upload_and_image_url_find_the_image(page: Browser, server: Server, tmp_path: Path) -> None:
    cards = open_query(page, server, RED_CIRCLE)
    target = cards[2]
    image = tmp_path / "query.jpg"
    image.write_bytes(server.call(f"/image/{target['uid']}")[1])
    before = searches(page)
    upload = page.send("Runtime.evaluate", expression="document.querySelector('#upload')")["result"]["objectId"]
    page.send("DOM.setFileInputFiles", files=[str(image)], objectId=upload)  # as if the user picked the file
    by_upload = wait_search(page, before)
    assert by_upload[0]["uid"] == target["uid"]
    assert "images like query.jpg" in page.evaluate("document.querySelector('#status').textContent")
    by_url = act(page, f"(() => {{ document.querySelector('#image-url').value = '{target['url']}';"
                       " document.querySelector('#url-form').requestSubmit(); })()")
    assert by_url[0]["uid"] == target["uid"]  # fetched by the service (loopback allowed here), not the browser


def _lake_row(lake: Path, stage: str, uid: int) -> dict[str, Any]:
    for path in sorted(lake.glob(f"{stage}/crawl=*/segment=*/{stage}.parquet")):
        table = pq.read_table(path)
        rows = table.filter(pa.compute.equal(table.column(R.UID), uid)).to_pylist()
        if rows:
            return dict(rows[0])
    raise AssertionError(f"uid {uid} is not in {stage}")


def provenance_cell(page: Browser, section: str, key: str) -> str | None:
    """The value the provenance panel shows for `key` in its `section` table (None: no such row)."""
    return page.evaluate(f"document.querySelector('#provenance section[data-section=\"{section}\"] "
                         f"tr[data-key=\"{key}\"] td')?.textContent ?? null")


def test_provenance_panel_shows_the_wat_record_and_dedupe(page: Browser, server: Server, indexed_lake: Path) -> None:
    cards = open_query(page, server, RED_CIRCLE)
    page.evaluate("document.querySelector('#grid .card button.explain').click()")
    page.wait_for("!!document.querySelector('#provenance section[data-section=\"pairs\"]')", 60)
    page.screenshot(artifacts() / "explorer-provenance.png")
    uid = int(cards[0]["uid"])
    pairs = _lake_row(indexed_lake, "pairs", uid)
    assert provenance_cell(page, "pairs", R.WAT_RECORD) == str(pairs[R.WAT_RECORD])
    assert provenance_cell(page, "pairs", R.WAT_FILE) == str(pairs[R.WAT_FILE])
    survivor = str(_lake_row(indexed_lake, "dedupe", uid)[R.SURVIVOR]).lower()
    assert provenance_cell(page, "dedupe", R.SURVIVOR) == survivor == "true"
    # a search result is in the index: kept at every stage
    assert page.evaluate("document.querySelector('#provenance .verdict h3').textContent") == "Kept"


def test_provenance_of_a_result_taken_down_after_it_was_shown(page: Browser, server: Server,
                                                               indexed_lake: Path) -> None:
    cards = open_query(page, server, RED_CIRCLE)
    uid = int(cards[0]["uid"])
    row = _lake_row(indexed_lake, "pairs", uid)
    write_parquet(pa.table({
        R.UID: [uid], R.CRAWL: [row[R.CRAWL]], R.SEGMENT: [row[R.SEGMENT]], blocklist.LIST: ["court-order-7"],
        blocklist.KIND: [blocklist.KIND_UID], blocklist.URL_SHA256: [blocklist.url_sha256(row[R.URL])],
        blocklist.HOST: [blocklist.url_host(row[R.URL])], blocklist.MATCHED_UNIX: [1_712_345_678.5],
    }, schema=blocklist.TAKEN_DOWN_SCHEMA), blocklist.taken_down_path(str(indexed_lake)))
    try:  # the list is ingested while the page still shows the result: its provenance says only that
        page.evaluate("document.querySelector('#grid .card button.explain').click()")
        page.wait_for("document.querySelector('#provenance .verdict h3')?.textContent === 'Taken down'", 60)
        page.screenshot(artifacts() / "explorer-taken-down.png")
        assert page.evaluate("document.querySelector('#provenance .verdict .reason').textContent") == (
            "by the takedown list court-order-7")
        assert provenance_cell(page, "pairs", R.URL) is None
        assert row[R.URL] not in page.evaluate("document.querySelector('#provenance').textContent")
        assert str(uid) not in [c["uid"] for c in act(page, "document.querySelector('#search-form').requestSubmit()")]
    finally:
        Path(blocklist.taken_down_path(str(indexed_lake))).unlink(missing_ok=True)


def _downloaded(folder: Path, suffix: str) -> Path:
    deadline = time.monotonic() + 60
    while True:
        done = [p for p in folder.glob(f"*{suffix}") if not p.name.endswith(".crdownload")]
        if done:
            return done[0]
        assert time.monotonic() < deadline, f"no {suffix} download in {folder}: {list(folder.iterdir())}"
        time.sleep(0.2)


def test_export_downloads_the_shown_results_for_img2dataset(page: Browser, server: Server, tmp_path: Path) -> None:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    page.send("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads))
    open_query(page, server, RED_CIRCLE)
    shown = act(page, "(() => { const n = document.querySelector('#num-images'); n.value = '40';"
                      " n.dispatchEvent(new Event('change', {bubbles: true})); })()")
    # 40 asked for, fewer once near-duplicates are hidden: all on one page, no pager
    assert 20 <= len(shown) <= 40 and not page.evaluate("document.querySelector('#pager').children.length")
    page.evaluate("document.querySelector('#export-parquet').click()")
    parquet = _downloaded(downloads, ".parquet")
    table = pq.read_table(parquet)
    assert parquet.name == "curation-results.parquet" and table.column_names[:2] == ["url", "caption"]
    assert [str(u) for u in table.column("uid").to_pylist()] == [c["uid"] for c in shown]
    assert table.column("url").to_pylist() == [c["url"] for c in shown]
    work = tmp_path / "reader"
    work.mkdir()
    reader = Reader(str(parquet), "parquet", "url", "caption", None, None, ["uid"], 1000, set(), str(work))
    shards = [pa.ipc.open_file(pa.memory_map(path)).read_all() for _, path in reader]
    assert sum(s.num_rows for s in shards) == len(shown) and shards[0].column("url").to_pylist()[0] == shown[0]["url"]
    page.evaluate("document.querySelector('#export-json').click()")
    rows = json.loads(_downloaded(downloads, ".json").read_text())
    assert [r["url"] for r in rows] == [c["url"] for c in shown]


def test_save_as_subset_publishes_a_release(indexed_lake: Path, sample_models: dict[str, Any], page: Browser,
                                            tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    shutil.copytree(indexed_lake, lake)  # the release is written into the lake
    with Server(_config(lake, sample_models)) as s:
        open_query(page, s, RED_CIRCLE)
        page.evaluate("document.querySelector('#save-open').click()")
        page.evaluate("(() => { const f = document.querySelector('#save-form').elements; f.name.value = 'red_circles';"
                      " f.description.value = 'red circles from the explorer';"
                      " f.cut.value = 'top_k'; f.top_k.value = '10';"
                      " document.querySelector('#save-submit').click(); })()")
        saved = page.wait_for("document.querySelector('#save-result .saved, #save-result .error')?.textContent", 120)
        page.screenshot(artifacts() / "explorer-saved-subset.png")
        assert saved.startswith("Saved subset red_circles, release 1"), saved
        # the new subset filters the search: only its members are shown
        page.evaluate("document.querySelector('#save-cancel').click()")
        members = act(page, "(() => { const f = document.querySelector('#filters').elements.subset;"
                            " f.value = 'red_circles'; f.dispatchEvent(new Event('change', {bubbles: true})); })()")
    latest = latest_release(str(lake), "red_circles")
    assert latest is not None and latest["release"] == 1
    rows = read_release(str(lake), "red_circles", latest)
    assert 1 <= rows.num_rows <= 10 and rows.column_names[:2] == ["url", "caption"]
    assert members and {int(c["uid"]) for c in members} <= set(rows.column(R.UID).to_pylist())


def test_the_page_sends_the_bearer_token(indexed_lake: Path, sample_models: dict[str, Any], page: Browser) -> None:
    with Server(_config(indexed_lake, sample_models, token=TOKEN)) as s:
        page.goto(f"{s.url}/?{urllib.parse.urlencode({'q': RED_CIRCLE})}")
        page.wait_for("!!document.querySelector('#status.error')", 60)
        status = page.evaluate("document.querySelector('#status').textContent")
        assert "needs its bearer token" in status and searches(page) == 1
        cards = act(page, f"(() => {{ document.querySelector('#token').value = '{TOKEN}';"
                          " document.querySelector('#token-form').requestSubmit(); })()")
        assert len(cards) == 40  # thumbnails too: fetched with the token (an <img src> could not send it)
        assert page.evaluate("sessionStorage.getItem('curation-explorer-token')") == TOKEN
        page.evaluate("sessionStorage.clear()")  # the tab's later tests run without it
