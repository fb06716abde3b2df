"""The sample web server: each HTTP behaviour truth names is served as named."""

from __future__ import annotations

import http.client
import io
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest
from PIL import Image

from curation.sample.server import SampleWebServer
from tests.conftest import SampleWeb


def _first(sample_web: SampleWeb, behaviour: str) -> dict[str, object]:
    return next(r for r in sample_web.truth() if r["http_behavior"] == behaviour)


def _raw_get(url: str) -> http.client.HTTPResponse:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
    return conn.getresponse()


def test_ok_serves_the_truth_bytes(sample_web: SampleWeb, sample_server: SampleWebServer) -> None:
    row = _first(sample_web, "ok")
    with urllib.request.urlopen(str(row["url"]), timeout=10) as resp:
        body = resp.read()
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("image/")
    assert body == (sample_web.root / str(row["file"])).read_bytes()


@pytest.mark.parametrize(("behaviour", "status"), [("not_found", 404), ("server_error", 500)])
def test_error_statuses(sample_web: SampleWeb, sample_server: SampleWebServer, behaviour: str, status: int) -> None:
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(str(_first(sample_web, behaviour)["url"]), timeout=10)
    assert err.value.code == status


def test_redirect_chain_ends_at_the_image(sample_web: SampleWeb, sample_server: SampleWebServer) -> None:
    row = _first(sample_web, "redirect")
    first = _raw_get(str(row["url"]))
    assert first.status == 302
    with urllib.request.urlopen(str(row["url"]), timeout=10) as resp:
        assert resp.status == 200 and resp.url != row["url"] and "/_hop/1/" in resp.url
        assert resp.read() == (sample_web.root / str(row["file"])).read_bytes()


def test_redirect_loop_never_ends(sample_web: SampleWeb, sample_server: SampleWebServer) -> None:
    with pytest.raises(urllib.error.HTTPError, match=r"infinite loop|redirect"):
        urllib.request.urlopen(str(_first(sample_web, "redirect_loop")["url"]), timeout=10)


def test_slow_response_is_slow_but_complete(sample_web: SampleWeb, sample_server: SampleWebServer) -> None:
    row = _first(sample_web, "slow")
    started = time.perf_counter()
    with urllib.request.urlopen(str(row["url"]), timeout=10) as resp:
        assert len(resp.read()) == row["bytes"]
    assert time.perf_counter() - started >= 1.4


@pytest.mark.parametrize(("behaviour", "value"), [("x_robots_noai", "noai"), ("x_robots_nofollow", "nofollow")])
def test_x_robots_tag(sample_web: SampleWeb, sample_server: SampleWebServer, behaviour: str, value: str) -> None:
    with urllib.request.urlopen(str(_first(sample_web, behaviour)["url"]), timeout=10) as resp:
        assert value in resp.headers["X-Robots-Tag"]


def test_wrong_content_type_is_still_an_image(sample_web: SampleWeb, sample_server: SampleWebServer) -> None:
    with urllib.request.urlopen(str(_first(sample_web, "wrong_content_type")["url"]), timeout=10) as resp:
        assert resp.headers["Content-Type"] == "text/plain"
        Image.open(io.BytesIO(resp.read())).verify()


def test_not_an_image_and_corrupt_do_not_decode(sample_web: SampleWeb, sample_server: SampleWebServer) -> None:
    for behaviour in ("not_an_image", "corrupt"):
        with urllib.request.urlopen(str(_first(sample_web, behaviour)["url"]), timeout=10) as resp:
            assert resp.headers["Content-Type"] == "image/jpeg"
            body = resp.read()
        with pytest.raises(Exception):  # noqa: B017 - PIL raises several types for undecodable data
            Image.open(io.BytesIO(body)).load()


def test_truncated_body_is_incomplete(sample_web: SampleWeb, sample_server: SampleWebServer) -> None:
    resp = _raw_get(str(_first(sample_web, "truncated")["url"]))
    with pytest.raises(http.client.IncompleteRead):
        resp.read()


def test_bomb_and_oversized_declare_too_many_pixels(sample_web: SampleWeb, sample_server: SampleWebServer) -> None:
    for behaviour, pixels in (("decompression_bomb", 400_000_000), ("oversized", 90_250_000)):
        row = _first(sample_web, behaviour)
        with urllib.request.urlopen(str(row["url"]), timeout=10) as resp:
            body = resp.read()
        assert len(body) < 100_000  # small on the wire ...
        width, height = _png_size(body)
        assert width * height == pixels > 89_478_484  # ... huge once decoded


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_tiny_image_is_under_laions_floor(sample_web: SampleWeb, sample_server: SampleWebServer) -> None:
    with urllib.request.urlopen(str(_first(sample_web, "tiny")["url"]), timeout=10) as resp:
        assert len(resp.read()) < 5000


def test_unknown_paths_are_404_and_every_request_is_counted(
    sample_web: SampleWeb, sample_server: SampleWebServer
) -> None:
    before = sample_server.total_hits
    url = f"http://127.0.0.1:{sample_web.config.port}/no/such/image.jpg"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, timeout=10)
    assert err.value.code == 404
    assert sample_server.total_hits == before + 1
    assert sample_server.hits[("127.0.0.1", "/no/such/image.jpg")] == 1


def test_second_host_serves_its_own_urls(sample_web: SampleWeb, sample_server: SampleWebServer) -> None:
    row = next(
        r for r in sample_web.truth() if str(r["url"]).startswith("http://127.0.0.2") and r["http_behavior"] == "ok"
    )
    with urllib.request.urlopen(str(row["url"]), timeout=10) as resp:
        assert resp.status == 200
