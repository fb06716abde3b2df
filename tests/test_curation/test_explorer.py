"""The explorer's files as `curation serve` ships them: the page at `/` and its script and style, with their content
types and security headers, public while the API keeps its token, and no API route shadowed by them or they by it.
The page itself is driven in Chromium by tests/test_ui/test_explorer.py."""

from __future__ import annotations

from pathlib import Path

from curation.explorer import STATIC_DIR
from curation.service import ServiceConfig
from tests.servers import Server

TOKEN = "test-token-0123456789abcdef"


def test_the_page_and_its_files_are_served_beside_the_api(indexed_lake: Path) -> None:
    with Server(ServiceConfig(lake_root=str(indexed_lake), token=TOKEN)) as s:
        status, page, headers = s.call("/")
        assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
        assert page == (STATIC_DIR / "index.html").read_bytes()
        assert b'src="explorer/app.js"' in page and b'href="explorer/style.css"' in page
        assert "script-src 'self'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff"
        for name, kind in (("app.js", "text/javascript; charset=utf-8"), ("style.css", "text/css; charset=utf-8")):
            status, body, headers = s.call(f"/explorer/{name}")  # no token: the files hold no data
            assert (status, headers["content-type"]) == (200, kind) and body == (STATIC_DIR / name).read_bytes()
        for path in ("/explorer/__init__.py", "/explorer/index.html", "/explorer/..%2Fservice.py", "/index.html"):
            assert s.call(path)[0] == 404, path
        # the API is neither shadowed by the page nor open without the token
        assert s.call("/health")[1]["status"] == "ok"
        assert s.call("/indices-list")[0] == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert s.call("/indices-list", headers=auth)[1] == ["curation"]
        assert s.call("/", {"text": "x"})[0] == 405  # a POST to / is no search
        status, out, _ = s.call("/knn-service", {"embedding_input": [1.0]}, headers=auth)
        assert status == 400 and "embedding_input" in out["error"]
