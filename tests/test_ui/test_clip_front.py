"""clip-retrieval's own web front-end (clip-front, the built files from the `clip-retrieval` package, unchanged)
against our search service, in a headless Chromium: a text query renders images of the concept from our lake.

clip-front is a web component whose results live in its shadow DOM, so the page is read over the DevTools protocol
(tests/browser.py). The screenshot is kept under $CURATION_TEST_ARTIFACTS/ui (default .data/test-artifacts/ui).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.parse
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from curation import records as R
from curation.netguard import NetPolicy
from curation.service import ServiceConfig
from tests.browser import browser, chromium_path
from tests.conftest import SampleWeb
from tests.servers import Server, StaticFiles

pytestmark = pytest.mark.ui
FRONT = Path(__file__).resolve().parents[2] / ".cache" / "clip-retrieval" / "front" / "build"
IMAGES_JS = ("Array.from(document.querySelector('clip-front').shadowRoot.querySelectorAll('img'))"
             ".map(i => i.getAttribute('src')).filter(s => s && s.startsWith('http'))")


def test_clip_front_shows_our_search_results(indexed_lake: Path, sample_models: dict[str, Any],
                                             sample_web: SampleWeb, tmp_path: Path) -> None:
    chromium_path()
    if not (FRONT / "index.html").is_file():
        pytest.fail(f"{FRONT} is missing: scripts/test.sh installs clip-retrieval there (--no-deps)")
    front = tmp_path / "front"
    shutil.copytree(FRONT, front)
    concept_of = {r["url"]: r["concept"] for r in sample_web.truth()}
    lake_urls = {u for p in indexed_lake.glob("pairs/crawl=*/segment=*/pairs.parquet")
                 for u in pq.read_table(p, columns=[R.URL]).column(R.URL).to_pylist()}
    config = ServiceConfig(lake_root=str(indexed_lake), spec=sample_models, device="cpu", rate_per_s=1000,
                           burst=1000, url_policy=NetPolicy.with_loopback())
    with Server(config) as service:
        (front / "config.json").write_text(json.dumps({"defaultBackend": service.url, "defaultIndex": "curation"}))
        with StaticFiles(front) as static, browser() as page:
            query = urllib.parse.urlencode({"back": service.url, "index": "curation",
                                            "query": "a drawing of a red circle"})
            page.goto(f"{static.url}/?{query}")
            shown = page.wait_for(f"(() => {{ const s = {IMAGES_JS}; return s.length >= 10 ? s : null; }})()", 90)
            artifacts = Path(os.environ.get("CURATION_TEST_ARTIFACTS", ".data/test-artifacts")) / "ui"
            artifacts.mkdir(parents=True, exist_ok=True)
            shot = page.screenshot(artifacts / "clip-front-red-circle.png")
        requests = service.call("/metrics")[1].decode()
    assert shot.stat().st_size > 10_000
    assert set(shown) <= lake_urls  # every image the front shows is a result from our lake
    # precision is measured in tests/test_curation/test_service.py; here: the front shows the query's colour,
    # and the toy CLIP's shape confusion (red hexagon for red circle) is allowed
    top = [concept_of.get(u) or "" for u in shown[:10]]
    assert sum(c.startswith("red ") for c in top) >= 8, top
    assert top.count("red circle") >= 3, top
    assert 'curation_requests_total{endpoint="knn",status="200"}' in requests
    assert 'curation_requests_total{endpoint="indices",status="200"}' in requests
