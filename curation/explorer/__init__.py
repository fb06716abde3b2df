"""The explorer: the search service's own web front-end (plain HTML, JavaScript and CSS here, no build step), which
`curation serve` ships at `/` beside the API.

The page calls the API from the same origin with relative paths (so it also works behind a path prefix): search
(`/knn-service`), thumbnails (`/image/{uid}`), provenance (`/explain/{uid}`), export (`/export`) and save-as-subset
(`/subsets`). Its own files are served without the bearer token, since they hold no data and a browser cannot send a
header when it navigates; the page sends the token the user types (kept in sessionStorage, so it leaves with the tab)
with every API call. A strict Content-Security-Policy lets the page load only its own script and style, and images
from the service or the blob URLs it makes of them; captions are web text and are only ever set as text.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

STATIC_DIR = Path(__file__).parent
PAGE = "index.html"
# The files served, with their content types named here rather than guessed from the platform's MIME table.
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
          "form-action 'none'; frame-ancestors 'none'; base-uri 'none'")
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def explorer_routes() -> list[BaseRoute]:
    """`GET /` (the page) and `GET /explorer/{name}` (its script and style); nothing else under either path."""
    return [Route("/", _page, methods=["GET"]), Route("/explorer/{name}", _asset, methods=["GET"])]


async def _page(request: Request) -> Response:
    return FileResponse(STATIC_DIR / PAGE, media_type="text/html; charset=utf-8",
                        headers={**_HEADERS, "Content-Security-Policy": POLICY, "Referrer-Policy": "no-referrer"})


async def _asset(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in ASSETS:
        return PlainTextResponse("not found", status_code=404)
    return FileResponse(STATIC_DIR / name, media_type=ASSETS[name], headers=_HEADERS)
