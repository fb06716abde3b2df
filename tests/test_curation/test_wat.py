"""Tests for curation.wat: WAT reading, LAION extraction rules, language ID, uid, dedupe and bad input.

The WAT files are written here, one gzip member per WARC record with Common Crawl's JSON envelope; the
helpers (`response_doc`, `page_members`, `write_wat`, `write_synthetic_wat`) are reused by
benchmarks/bench_extract.py.
"""

from __future__ import annotations

import gzip
import json
import random
import uuid
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fsspec
import ftfy
import mmh3
import pyarrow as pa
import pytest

from curation import records as R
from curation.wat import (
    ExtractConfig,
    WatReader,
    WatReadError,
    clean_alt,
    detect_language,
    extract_pairs,
    iter_wat_records,
    laion_uid,
    resolve_image_url,
)

DATE = "2024-12-03T12:34:56Z"
CFG = ExtractConfig()


# ---------------------------------------------------------------------------------------------------
# Writing WAT files


def _urn() -> str:
    return f"<urn:uuid:{uuid.uuid4()}>"


def warc_member(headers: dict[str, str], payload: bytes) -> bytes:
    """One gzip member holding one WARC/1.0 record."""
    head = "WARC/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += f"Content-Length: {len(payload)}\r\n\r\n"
    return gzip.compress(head.encode() + payload + b"\r\n\r\n", compresslevel=6)


def warcinfo_member(filename: str = "CC-MAIN-20241203000000-20241203030000-00000.warc.wat.gz") -> bytes:
    payload = (
        b"Software-Info: ia-web-commons.1.1.10-SNAPSHOT-20241201\r\n"
        b"Extracted-Date: Tue, 03 Dec 2024 13:00:00 GMT\r\nformat: WARC File Format 1.0\r\n"
    )
    return warc_member(
        {"WARC-Type": "warcinfo", "WARC-Date": DATE, "WARC-Filename": filename,
         "WARC-Record-ID": _urn(), "Content-Type": "application/warc-fields"},
        payload,
    )


def envelope(warc_type: str, page_url: Any, date: Any = DATE, payload_metadata: dict[str, Any] | None = None
             ) -> dict[str, Any]:
    """A WAT JSON document as Common Crawl writes it (Container + Envelope)."""
    return {
        "Container": {
            "IsCompressed": True, "Offset": "1234", "Compressed": True,
            "Filename": "CC-MAIN-20241203000000-20241203030000-00000.warc.gz",
            "Gzip-Metadata": {"Deflate-Length": "5120", "Header-Length": "10", "Footer-Length": "8",
                              "Inflated-CRC": "-123456", "Inflated-Length": "20480"},
        },
        "Envelope": {
            "Format": "WARC", "WARC-Header-Length": "612", "Actual-Content-Length": "19868",
            "Block-Digest": "sha1:AAAABBBBCCCCDDDDEEEEFFFFGGGGHHHH",
            "WARC-Header-Metadata": {
                "WARC-Type": warc_type, "WARC-Date": date, "WARC-Record-ID": _urn(),
                "Content-Length": "19868", "Content-Type": f"application/http; msgtype={warc_type}",
                "WARC-Warcinfo-ID": _urn(), "WARC-Concurrent-To": _urn(), "WARC-IP-Address": "203.0.113.7",
                "WARC-Target-URI": page_url, "WARC-Payload-Digest": "sha1:PAYLOADDIGEST",
                "WARC-Block-Digest": "sha1:BLOCKDIGEST", "WARC-Identified-Payload-Type": "text/html",
            },
            "Payload-Metadata": payload_metadata or {},
        },
    }


def response_doc(page_url: Any, links: list[Any], *, base: Any = None, date: Any = DATE,
                 warc_type: Any = "response", title: str = "A page") -> dict[str, Any]:
    head: dict[str, Any] = {
        "Title": title,
        "Metas": [{"name": "description", "content": "Things and more things"},
                  {"property": "og:image", "content": "/og.jpg"}],
        "Link": [{"path": "LINK@/href", "url": "/style.css", "rel": "stylesheet", "type": "text/css"}],
    }
    if base is not None:
        head["Base"] = base
    hrm = {
        "Response-Message": {"Version": "HTTP/1.1", "Status": "200", "Reason": "OK"},
        "Headers-Length": "412", "Entity-Length": "19456", "Entity-Trailing-Slop-Length": "0",
        "Headers": {"Date": "Tue, 03 Dec 2024 12:34:56 GMT", "Content-Type": "text/html; charset=UTF-8",
                    "Server": "nginx", "Set-Cookie": ["a=1; Path=/", "b=2; Path=/"]},
        "HTML-Metadata": {"Head": head, "Links": links},
        "Entity-Digest": "sha1:ENTITYDIGEST",
    }
    return envelope(warc_type, page_url, date, {
        "Actual-Content-Type": "application/http; msgtype=response", "HTTP-Response-Metadata": hrm})


def metadata_member(doc: dict[str, Any] | None, page_url: str, *, payload: bytes | None = None) -> bytes:
    """A WAT `metadata` record wrapping `doc` (or a raw payload, for malformed-input tests)."""
    body = payload if payload is not None else json.dumps(doc, separators=(",", ":")).encode()
    return warc_member(
        {"WARC-Type": "metadata", "WARC-Target-URI": page_url, "WARC-Date": DATE,
         "WARC-Record-ID": _urn(), "WARC-Refers-To": _urn(), "Content-Type": "application/json"},
        body,
    )


def img(url: str, alt: str | None = None) -> dict[str, str]:
    link = {"path": "IMG@/src", "url": url}
    if alt is not None:
        link["alt"] = alt
    return link


def page_members(page_url: str, links: list[Any], **kw: Any) -> list[bytes]:
    """The three WAT records Common Crawl writes per fetched page: request, response, fetch metadata."""
    request = envelope("request", page_url, payload_metadata={
        "Actual-Content-Type": "application/http; msgtype=request",
        "HTTP-Request-Metadata": {"Request-Message": {"Method": "GET", "Path": "/", "Version": "HTTP/1.1"},
                                  "Headers": {"Host": "example.com", "User-Agent": "CCBot/2.0"}}})
    fetch = envelope("metadata", page_url, payload_metadata={
        "Actual-Content-Type": "application/warc-fields",
        "WARC-Metadata-Metadata": {"Metadata-Records": [{"Name": "fetchTimeMs", "Value": "152"}]}})
    response = response_doc(page_url, links, **kw)
    return [metadata_member(request, page_url), metadata_member(response, page_url),
            metadata_member(fetch, page_url)]


def write_wat(path: Path | str, members: Iterable[bytes]) -> list[int]:
    """Write members to a file; returns the byte offset of each member."""
    offsets = []
    at = 0
    with open(path, "wb") as f:
        for member in members:
            offsets.append(at)
            f.write(member)
            at += len(member)
    return offsets


_WORDS = (
    "red", "green", "blue", "small", "large", "wooden", "kitchen", "table", "garden", "house", "photo",
    "view", "city", "river", "mountain", "summer", "winter", "product", "detail", "new", "sale", "shoes",
    "dress", "chair", "lamp", "coffee", "book", "cover", "logo", "banner", "Haus", "Garten", "Tisch", "rouge",
    "maison", "jardin", "grande", "casa", "verde",
)


def write_synthetic_wat(path: Path | str, n_pages: int, seed: int = 0, max_images: int = 30) -> None:
    """A WAT of `n_pages` realistic pages: many anchors, 0..`max_images` images plus a site-wide logo,
    relative/base/svg/gif/data sources, and alt texts from empty to sentence-long."""
    rnd = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rnd.choice(_WORDS) for _ in range(k))

    members = [warcinfo_member()]
    for p in range(n_pages):
        site = f"site{p // 4}.example{p // 4 % 7}.com"  # four pages per site, sharing its logo
        page = f"https://{site}/{words(2).replace(' ', '/')}/page-{p}.html"
        links: list[dict[str, str]] = [
            {"path": "A@/href", "url": f"/{words(2).replace(' ', '-')}/{rnd.randint(0, 9999)}",
             "title": words(2), "text": words(3)}
            for _ in range(rnd.randint(60, 240))
        ]
        links.append(img("/static/logo.png", f"{site} logo"))
        for i in range(rnd.randint(0, max_images)):
            style = rnd.random()
            if style < 0.35:
                src = f"/images/{p}/{i}.jpg"
            elif style < 0.55:
                src = f"https://cdn{p % 11}.example.net/{p}-{i}.webp?w=640"
            elif style < 0.65:
                src = f"//img.example.org/{p}/{i}.png"
            elif style < 0.72:
                src = f"thumbs/{i} small.jpg"
            elif style < 0.78:
                src = f"/icons/{i}.svg"
            elif style < 0.82:
                src = f"/anim/{i}.gif"
            elif style < 0.85:
                src = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
            else:
                src = f"https://shop.example.com/p/{rnd.randint(0, 999)}.jpg"
            alt_style = rnd.random()
            alt = ("" if alt_style < 0.45 else words(1)[:4] if alt_style < 0.55
                   else words(rnd.randint(2, 12)))
            links.insert(rnd.randrange(len(links)), img(src, alt))
        kw = {"base": f"https://{site}/base/"} if p % 13 == 0 else {}
        members.extend(page_members(page, links, title=words(6), **kw))
    write_wat(path, members)


# ---------------------------------------------------------------------------------------------------
# Rules


@pytest.mark.parametrize(
    ("page", "base", "raw", "expected"),
    [
        ("https://ex.com/a/b/page.html", None, "img/x.jpg", "https://ex.com/a/b/img/x.jpg"),
        ("https://ex.com/a/b/page.html", None, "../x.jpg", "https://ex.com/a/x.jpg"),
        ("https://ex.com/a/b/page.html", None, "/root/x.jpg", "https://ex.com/root/x.jpg"),
        ("https://ex.com/a/page.html", None, "//cdn.ex.net/x.jpg", "https://cdn.ex.net/x.jpg"),
        ("http://ex.com/a/page.html", None, "//cdn.ex.net/x.jpg", "http://cdn.ex.net/x.jpg"),
        ("https://ex.com/a/page.html", "https://static.ex.org/assets/", "x.jpg",
         "https://static.ex.org/assets/x.jpg"),
        ("https://ex.com/a/page.html", "/media/", "x.jpg", "https://ex.com/media/x.jpg"),
        ("https://ex.com/a/page.html", "sub/", "x.jpg", "https://ex.com/a/sub/x.jpg"),
        ("https://ex.com/a/page.html", ["https://first.ex/", "https://second.ex/"], "x.jpg",
         "https://first.ex/x.jpg"),
        ("https://ex.com/a/page.html", None, "https://other.org/y.png", "https://other.org/y.png"),
        ("https://ex.com/a/page.html", None, "  /x.jpg\n", "https://ex.com/x.jpg"),
        ("https://ex.com/", None, "/a\n/b\t.jpg", "https://ex.com/a/b.jpg"),
        ("https://ex.com/", None, "/my photo.jpg", "https://ex.com/my%20photo.jpg"),
        ("https://ex.com/", None, "/my%20photo.jpg", "https://ex.com/my%20photo.jpg"),
        ("https://ex.com/", None, "/grüne.jpg?q=a b", "https://ex.com/gr%C3%BCne.jpg?q=a%20b"),
        ("https://ex.com/", None, "/100%.jpg", "https://ex.com/100%25.jpg"),
        ("https://ex.com/", None, "https://bücher.de/x.jpg", "https://xn--bcher-kva.de/x.jpg"),
    ],
)
def test_resolve_image_url_resolves_and_quotes(page: str, base: Any, raw: str, expected: str) -> None:
    from curation.wat import first_value

    url, reason = resolve_image_url(page, first_value(base), raw, CFG)
    assert (url, reason) == (expected, None)
    # quoting is idempotent: a resolved URL fed back in comes out unchanged
    assert resolve_image_url("https://unrelated.example/", None, expected, CFG) == (expected, None)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("data:image/png;base64,AAAA", R.DROP_DATA_URI),
        (" DATA:image/png;base64,AAAA", R.DROP_DATA_URI),
        ("javascript:void(0)", R.DROP_JAVASCRIPT),
        ("JavaScript:alert(1)", R.DROP_JAVASCRIPT),
        ("/icons/a.svg", R.DROP_SVG),
        ("/icons/a.SVG?x=1", R.DROP_SVG),
        ("https://cdn.svgrepo.example/x.png", R.DROP_SVG),  # LAION's substring rule
        ("/anim/a.gif", R.DROP_GIF),
        ("/anim/a.GIF.jpg", R.DROP_GIF),
        ("/x" * 1001 + ".jpg", R.DROP_URL_TOO_LONG),
        ("ftp://files.example.com/a.jpg", R.DROP_SCHEME),
        ("mailto:someone@example.com", R.DROP_SCHEME),
        ("http:///nohost.jpg", R.DROP_BAD_HOST),
        ("https://" + "a" * 57 + ".com/x.jpg", R.DROP_BAD_HOST),
        ("http://[::1/x.jpg", R.DROP_BAD_HOST),
        ("http://ex ample.com/x.jpg", R.DROP_BAD_HOST),
    ],
)
def test_resolve_image_url_drops(raw: str, reason: str) -> None:
    assert resolve_image_url("https://ex.com/a/page.html", None, raw, CFG) == (None, reason)


def test_join_fast_paths_equal_urljoin() -> None:
    from urllib.parse import urljoin

    from curation.wat import _join

    pages = ["https://ex.com/a/b/page.html?q=1#f", "http://user@ex.com:8080/dir/", "https://ex.com"]
    bases = ["", "https://cdn.ex.org/base/", "/root/", "sub/dir/", "http://other.ex"]
    raws = ["/x.jpg", "/x.jpg?", "/x.jpg#", "/x;", "/x;?a=1", "/x?#f", "/a/./b.jpg", "/a/../b.jpg",
            "/.hidden/x",
            "//cdn.ex.net/x.jpg", "//cdn.ex.net", "///x.jpg", "//", "https://o.ex/p?a=1&b=2#frag", "http://o.ex",
            "https://o.ex/a;p=1/b;q=2", "https://", "http:///x", "HTTPS://o.ex/X.jpg", "x.jpg", "../x.jpg",
            "?q=2", "#frag", "/", "/a//b.jpg", "https://o.ex/a/../b", "/x.jpg?a=/./b"]
    for page in pages:
        for base in bases:
            for raw in raws:
                expected = urljoin(urljoin(page, base) if base else page, raw)
                assert _join(page, base, raw) == expected, (page, base, raw)


def test_scheme_host_equals_urlsplit() -> None:
    from urllib.parse import urlsplit

    from curation.wat import _scheme_host

    for url in ["https://Ex.COM/a", "http://user:pw@ex.com:8080/x?y#z", "https://ex.com", "https://ex.com?q",
                "http://ex.com#f", "http:///x", "https://:80/x", "http://[::1]:8080/x", "ftp://ex.com/x",
                "https://bücher.de/x", "HTTP://EX.com/x", "https://a@b@ex.com/x"]:
        parts = urlsplit(url)
        assert _scheme_host(url) == (parts.scheme, parts.hostname), url


def test_url_limits_follow_config() -> None:
    host60 = "https://" + "a" * 56 + ".com/x.jpg"  # host of exactly 60 characters is kept
    assert resolve_image_url("https://ex.com/", None, host60, CFG)[1] is None
    narrow = ExtractConfig(max_host_chars=59)
    assert resolve_image_url("https://ex.com/", None, host60, narrow)[1] == R.DROP_BAD_HOST
    long_ok = "https://ex.com/" + "x" * (2000 - len("https://ex.com/"))
    assert resolve_image_url("https://ex.com/", None, long_ok, CFG) == (long_ok, None)
    custom = ExtractConfig(blocked_url_substrings=(".ico",))
    assert resolve_image_url("https://ex.com/", None, "/a.gif", custom)[1] is None
    assert resolve_image_url("https://ex.com/", None, "/favicon.ico", custom) == (None, R.DROP_BLOCKED_URL)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("A red apple", "A red apple"),
        ("  A\tred\n\napple  on\r\na   table ", "A red apple on a table"),
        ("grÃ¼ne Wiese", "grüne Wiese"),  # ftfy repairs mojibake
        ("Caf&eacute; &amp; bar", "Café & bar"),
        ("non\u00a0breaking\u2028space", "non breaking space"),
        ("zero\u200bwidth and \x00control\x7f chars", "zerowidth and control chars"),
        ("ﬁsh and chips", "fish and chips"),
        ("\x1b[31mred\x1b[0m text", "red text"),
        ("abcd", None),
        ("ab  cd", "ab cd"),
        ("  ab\n", None),
        ("", None),
        ("     ", None),
        ("日本語のテキ", "日本語のテキ"),
    ],
)
def test_clean_alt(raw: str, expected: str | None) -> None:
    assert clean_alt(raw, CFG) == expected


def test_clean_alt_ascii_fast_path_matches_ftfy() -> None:
    samples = ["plain words here", "x < y & z", "&lt;b&gt; tags", "tab\there", "a\r\nb", "semi;colon",
               "quote 'single' \"double\"", "\x1b[1mbold\x1b[0m caption", "AT&T logo", "&#233;t&#233; photo"]
    for s in samples:
        reference = " ".join("".join(c for c in ftfy.fix_text(s).replace("\t", " ").replace("\n", " ")
                                     .replace("\r", " ") if c.isprintable()).split())
        assert clean_alt(s, CFG) == (reference if len(reference) >= 5 else None), s


def test_min_alt_chars_is_configurable() -> None:
    assert clean_alt("abc", ExtractConfig(min_alt_chars=3)) == "abc"
    assert clean_alt("abcdef", ExtractConfig(min_alt_chars=7)) is None


def test_alt_text_is_cut_to_laions_2000_characters() -> None:
    long = "word " * 1000  # 5,000 characters
    text = clean_alt(long, CFG)
    assert text is not None and len(text) == 1999 and text == long[:1999]  # the cut lands on a space: stripped
    assert clean_alt("é" * 2500, CFG) == "é" * 2000
    assert clean_alt("abcdefgh", ExtractConfig(max_alt_chars=6)) == "abcdef"
    assert clean_alt("abc defgh", ExtractConfig(max_alt_chars=6)) == "abc de"


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("A red apple on a wooden kitchen table", "en"),
        ("Ein roter Apfel auf dem Tisch in der Küche", "de"),
        ("Une pomme rouge sur la table de la cuisine", "fr"),
        ("Sarajevo je glavni grad Bosne i Hercegovine, kuća", "bs"),
        ("qwzx vbnm plkj", ""),
        ("IMG_2031.jpg", ""),
        ("a\x00b\ud800 broken", ""),  # pycld2 raises on these code points
    ],
)
def test_detect_language(text: str, code: str) -> None:
    got, score = detect_language(text, CFG)
    assert got == code
    assert 0.0 <= score <= 1.0
    if code:
        assert score >= 0.7


def test_language_reliability_threshold_is_config() -> None:
    text = "A red apple on a wooden kitchen table"
    _, score = detect_language(text, CFG)
    assert detect_language(text, ExtractConfig(reliable_language_score=min(1.0, score + 0.01)))[0] == ""


def test_laion_uid_is_signed_mmh3() -> None:
    url, text = "https://example.com/cat.jpg", "A cat on a mat"
    assert laion_uid(url, text) == mmh3.hash64((url + text).encode("utf-8"))[0]
    unsigned = mmh3.hash64((url + text).encode("utf-8"), signed=False)[0]
    assert laion_uid(url, text) == (unsigned - (1 << 64) if unsigned >= 1 << 63 else unsigned)
    # Pinned values: a negative one proves the signed interpretation.
    assert laion_uid("https://example.com/cat.jpg", "A cat on a mat") == -4794113650655075765
    assert laion_uid("https://example.com/a.jpg", "hello world") == 4861356727569311501


def test_extract_config_validates() -> None:
    with pytest.raises(ValueError, match="min_alt_chars"):
        ExtractConfig(min_alt_chars=0)
    with pytest.raises(ValueError, match="reliable_language_score"):
        ExtractConfig(reliable_language_score=1.5)
    with pytest.raises(ValueError, match="blocked_url_substrings"):
        ExtractConfig(blocked_url_substrings=[".svg"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="low_threshold_languages"):
        ExtractConfig(low_threshold_languages=("hr", ""))


# ---------------------------------------------------------------------------------------------------
# Extraction end to end


def test_extract_pairs_end_to_end(tmp_path: Path) -> None:
    page = "https://shop.example.com/garden/index.html"
    links = [
        {"path": "A@/href", "url": "/about", "text": "About us"},
        img("/img/chair.jpg", "A wooden garden chair"),
        img("thumbs/lamp.jpg", "Eine schöne Lampe für den Garten"),
        img("//cdn.example.net/table.webp", "Une grande table de jardin en bois"),
        img("/img/no-alt.jpg"),
        img("/img/short.jpg", "Logo"),
        img("data:image/png;base64,AAAA", "inline image here"),
        img("/icons/cart.svg", "shopping cart icon"),
        {"path": "IMG@/data-src", "url": "/lazy.jpg", "alt": "lazy loaded image"},
    ]
    members = [warcinfo_member(), *page_members(page, links)]
    offsets = write_wat(tmp_path / "a.warc.wat.gz", members)
    result = extract_pairs([str(tmp_path / "a.warc.wat.gz")], crawl="CC-MAIN-2024-51", segment="007")

    t = result.table
    assert tuple(t.column_names) == R.PAIRS_COLUMNS
    assert t.schema.field(R.UID).type == pa.int64()
    assert t.schema.field(R.LANGUAGE_SCORE).type == pa.float32()
    assert t.schema.field(R.WAT_RECORD).type == pa.int64()
    rows = t.to_pylist()
    assert [(r[R.URL], r[R.TEXT], r[R.LANGUAGE]) for r in rows] == [
        ("https://shop.example.com/img/chair.jpg", "A wooden garden chair", "en"),
        ("https://shop.example.com/garden/thumbs/lamp.jpg", "Eine schöne Lampe für den Garten", "de"),
        ("https://cdn.example.net/table.webp", "Une grande table de jardin en bois", "fr"),
    ]
    response_offset = offsets[2]  # warcinfo, request, response, metadata
    for r in rows:
        assert r[R.UID] == laion_uid(r[R.URL], r[R.TEXT])
        assert r[R.PAGE_URL] == page
        assert r[R.WARC_DATE] == DATE
        assert (r[R.CRAWL], r[R.SEGMENT]) == ("CC-MAIN-2024-51", "007")
        assert r[R.WAT_FILE] == str(tmp_path / "a.warc.wat.gz")
        assert r[R.WAT_RECORD] == response_offset
        assert r[R.LANGUAGE_SCORE] >= 0.7
    c = result.counts
    assert (c["records"], c["pages"], c["image_links"], c["kept"]) == (4, 1, 7, 3)
    assert c[R.DROP_SHORT_ALT] == 2
    assert c[R.DROP_DATA_URI] == 1
    assert c[R.DROP_SVG] == 1
    assert c[R.DROP_NOT_IMAGE_LINK] == 1
    assert result.per_file == {str(tmp_path / "a.warc.wat.gz"): c}
    assert result.bytes_read == sum(len(m) for m in members)

    # the offset re-reads the record: one gzip member from there holds the page's response
    with open(tmp_path / "a.warc.wat.gz", "rb") as f:
        f.seek(rows[0][R.WAT_RECORD])
        member = zlib.decompressobj(31).decompress(f.read())
    assert b'"WARC-Type":"response"' in member and page.encode() in member


def test_only_response_records_are_used(tmp_path: Path) -> None:
    page = "https://ex.com/p.html"
    links = [img("/a.jpg", "a picture of a dog")]
    members = [
        warcinfo_member(),
        metadata_member(response_doc(page, links, warc_type="request"), page),
        metadata_member(response_doc(page, links, warc_type="metadata"), page),
        metadata_member(response_doc(page, links, warc_type="resource"), page),
    ]
    write_wat(tmp_path / "x.wat.gz", members)
    result = extract_pairs([str(tmp_path / "x.wat.gz")], crawl="c", segment="000")
    assert result.table.num_rows == 0
    assert result.counts["records"] == 4
    assert result.counts["pages"] == 0


def test_list_valued_headers(tmp_path: Path) -> None:
    page = "https://ex.com/dir/p.html"
    doc = response_doc([page, "https://ignored.example/"], [img("x.jpg", "a picture of a dog")],
                       base=["/assets/", "/other/"], date=[DATE, "2030-01-01T00:00:00Z"],
                       warc_type=["response"])
    write_wat(tmp_path / "x.wat.gz", [warcinfo_member(), metadata_member(doc, page)])
    rows = extract_pairs([str(tmp_path / "x.wat.gz")], crawl="c", segment="000").table.to_pylist()
    assert [(r[R.URL], r[R.PAGE_URL], r[R.WARC_DATE]) for r in rows] == [
        ("https://ex.com/assets/x.jpg", page, DATE)]


def test_repeated_warc_header_lines_become_lists(tmp_path: Path) -> None:
    payload = json.dumps(response_doc("https://ex.com/", [])).encode()
    head = (b"WARC/1.0\r\nWARC-Type: metadata\r\nWARC-Target-URI: https://ex.com/\r\n"
            b"WARC-Concurrent-To: <urn:a>\r\nWARC-Concurrent-To: <urn:b>\r\n"
            b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n")
    write_wat(tmp_path / "x.wat.gz", [gzip.compress(head + payload + b"\r\n\r\n")])
    (record,) = list(iter_wat_records(str(tmp_path / "x.wat.gz")))
    assert record.headers["WARC-Concurrent-To"] == ["<urn:a>", "<urn:b>"]
    assert record.header("warc-concurrent-to") == "<urn:a>"
    assert record.header("WARC-Type") == "metadata"
    assert record.payload == payload


def test_dedupe_within_call_and_against_earlier_partitions(tmp_path: Path) -> None:
    pair = img("/same.jpg", "the very same caption")
    first = [pair, pair, img("/same.jpg", "another caption for it"),
             img("/old.jpg", "seen in an old partition")]
    write_wat(tmp_path / "a.wat.gz", [warcinfo_member(), *page_members("https://ex.com/1.html", first)])
    write_wat(tmp_path / "b.wat.gz", [warcinfo_member(), *page_members("https://ex.com/2.html", [pair])])
    paths = [str(tmp_path / "a.wat.gz"), str(tmp_path / "b.wat.gz")]
    old = laion_uid("https://ex.com/old.jpg", "seen in an old partition")
    result = extract_pairs(paths, crawl="c", segment="000", exclude_uids={old, 12345})
    assert sorted(zip(result.table[R.URL].to_pylist(), result.table[R.TEXT].to_pylist(), strict=True)) == [
        ("https://ex.com/same.jpg", "another caption for it"),
        ("https://ex.com/same.jpg", "the very same caption"),
    ]
    assert result.counts[R.DROP_DUPLICATE] == 2
    assert result.counts[R.DROP_SEEN_BEFORE] == 1
    assert result.per_file[paths[0]][R.DROP_DUPLICATE] == 1
    assert result.per_file[paths[1]][R.DROP_DUPLICATE] == 1
    assert result.per_file[paths[1]]["kept"] == 0
    # the first occurrence wins: the kept row points at the first file
    assert set(result.table[R.WAT_FILE].to_pylist()) == {paths[0]}
    # a list works as exclude_uids too
    listed = extract_pairs(paths, crawl="c", segment="000", exclude_uids=[old])
    assert listed.counts[R.DROP_SEEN_BEFORE] == 1


# ---------------------------------------------------------------------------------------------------
# Bad input


def _pages(n: int) -> list[list[bytes]]:
    return [page_members(f"https://ex.com/p{i}.html", [img(f"/p{i}.jpg", f"caption number {i}")])
            for i in range(n)]


def test_corrupt_member_in_the_middle_is_skipped(tmp_path: Path) -> None:
    pages = _pages(5)
    bad = bytearray(pages[2][1])  # the response member of page 2
    for i in range(20, len(bad) - 20, 7):
        bad[i] ^= 0x5A
    pages[2][1] = bytes(bad)
    write_wat(tmp_path / "x.wat.gz", [warcinfo_member(), *(m for page in pages for m in page)])
    problems: list[tuple[str, int]] = []
    path = str(tmp_path / "x.wat.gz")
    records = list(iter_wat_records(path, on_problem=lambda r, o: problems.append((r, o))))
    assert len(records) == 1 + 5 * 3 - 1
    assert [r for r, _ in problems] == [R.BAD_GZIP_MEMBER]
    result = extract_pairs([str(tmp_path / "x.wat.gz")], crawl="c", segment="000")
    assert result.table[R.TEXT].to_pylist() == [f"caption number {i}" for i in (0, 1, 3, 4)]
    assert result.counts[R.BAD_GZIP_MEMBER] == 1


def test_crc_mismatch_counts_as_corrupt(tmp_path: Path) -> None:
    pages = _pages(3)
    bad = bytearray(pages[1][1])
    bad[-6] ^= 0xFF  # inside the CRC32 trailer: the data inflates but does not verify
    pages[1][1] = bytes(bad)
    write_wat(tmp_path / "x.wat.gz", [warcinfo_member(), *(m for page in pages for m in page)])
    result = extract_pairs([str(tmp_path / "x.wat.gz")], crawl="c", segment="000")
    assert result.counts[R.BAD_GZIP_MEMBER] == 1
    assert result.table[R.TEXT].to_pylist() == ["caption number 0", "caption number 2"]


def test_garbage_between_members_resynchronises(tmp_path: Path) -> None:
    pages = _pages(2)
    members = [warcinfo_member(), *pages[0], b"\x00garbage\x1f\x8b\x08 not a member" * 50, *pages[1]]
    write_wat(tmp_path / "x.wat.gz", members)
    result = extract_pairs([str(tmp_path / "x.wat.gz")], crawl="c", segment="000")
    assert result.counts[R.BAD_GZIP_MEMBER] == 1  # one corrupt stretch, counted once
    assert result.table[R.TEXT].to_pylist() == ["caption number 0", "caption number 1"]


def test_truncated_tail(tmp_path: Path) -> None:
    members = [warcinfo_member(), *(m for page in _pages(3) for m in page)]
    data = b"".join(members)
    cut = len(data) - len(members[-1]) - len(members[-2]) // 2  # halfway into the last response
    (tmp_path / "x.wat.gz").write_bytes(data[:cut])
    result = extract_pairs([str(tmp_path / "x.wat.gz")], crawl="c", segment="000")
    assert result.counts[R.TRUNCATED_FILE] == 1
    assert result.counts[R.BAD_GZIP_MEMBER] == 0
    assert result.table[R.TEXT].to_pylist() == ["caption number 0", "caption number 1"]


def test_malformed_payloads_are_counted(tmp_path: Path) -> None:
    page = "https://ex.com/p.html"
    good = response_doc(page, [img("/ok.jpg", "the good caption")])
    no_header = response_doc(page, [img("/x.jpg", "whatever caption")])
    del no_header["Envelope"]["WARC-Header-Metadata"]
    no_uri = response_doc(None, [img("/x.jpg", "whatever caption")])
    bad_links = response_doc(page, [])
    bad_links["Envelope"]["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"]["Links"] = "IMG@"
    valid = json.dumps(response_doc(page, [img("/é.jpg", "une légende française")]), ensure_ascii=False)
    members = [
        warcinfo_member(),
        metadata_member(None, page, payload=b'{"Envelope": {"Links": [{"path": "IMG@/src", "url": '),
        metadata_member(None, page, payload=valid.encode("latin-1")),  # not UTF-8
        metadata_member(no_header, page),
        metadata_member(no_uri, page),
        metadata_member(bad_links, page),
        gzip.compress(b"WARC/1.0\r\nWARC-Type: metadata\r\n\r\nIMG@"),  # no Content-Length
        gzip.compress(b"\xff\xfe not a warc record at all"),
        metadata_member(good, page),
    ]
    write_wat(tmp_path / "x.wat.gz", members)
    result = extract_pairs([str(tmp_path / "x.wat.gz")], crawl="c", segment="000")
    c = result.counts
    assert c[R.BAD_JSON] == 1
    assert c[R.BAD_ENCODING] == 1
    assert c[R.BAD_RECORD] == 5  # no WARC header, no URI, Links not a list, no Content-Length, not WARC
    assert result.table[R.TEXT].to_pylist() == ["the good caption"]


def test_bad_link_entries_are_counted(tmp_path: Path) -> None:
    page = "https://ex.com/p.html"
    links = [{"path": "IMG@/src"}, {"path": "IMG@/src", "url": 5, "alt": "a number url"},
             {"path": "IMG@/src", "url": "/ok.jpg", "alt": ["not", "a", "string"]},
             img("/fine.jpg", "a fine caption")]
    write_wat(tmp_path / "x.wat.gz", [warcinfo_member(), metadata_member(response_doc(page, links), page)])
    result = extract_pairs([str(tmp_path / "x.wat.gz")], crawl="c", segment="000")
    assert result.counts[R.BAD_RECORD] == 2
    assert result.counts[R.DROP_SHORT_ALT] == 1
    assert result.table[R.TEXT].to_pylist() == ["a fine caption"]


def test_unusual_link_layout_takes_the_full_parse(tmp_path: Path) -> None:
    # "path" not the first key, and a non-object entry: only a full JSON parse sees these right
    page = "https://ex.com/p.html"
    links = [{"alt": "alt before path", "path": "IMG@/src", "url": "/first.jpg"}, "IMG@/src",
             img("/second.jpg", "the usual key order")]
    write_wat(tmp_path / "x.wat.gz", [warcinfo_member(), metadata_member(response_doc(page, links), page)])
    result = extract_pairs([str(tmp_path / "x.wat.gz")], crawl="c", segment="000")
    assert result.table[R.URL].to_pylist() == ["https://ex.com/first.jpg", "https://ex.com/second.jpg"]
    assert result.counts[R.BAD_RECORD] == 1
    assert result.counts["image_links"] == 2


def _head_after_links(page: str) -> dict[str, Any]:
    doc = response_doc(page, [img("/real.jpg", "the real image")], base="/b/")
    html = doc["Envelope"]["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"]
    head = html.pop("Head")
    # a <meta> whose attributes mimic an image link, placed after Links: must not become a pair
    head["Metas"].append({"path": "IMG@/src", "url": "/meta-trick.jpg", "alt": "not an image"})
    html["Head"] = head
    return doc


def test_targeted_reader_agrees_with_full_parse(tmp_path: Path) -> None:
    from curation.wat import _read_page_full, _read_page_targeted

    path = tmp_path / "s.wat.gz"
    write_synthetic_wat(path, 60, seed=4)
    texts = [r.payload.decode() for r in iter_wat_records(str(path)) if b"IMG@" in r.payload]
    page = "https://ex.com/dir/p.html"
    texts += [
        json.dumps(_head_after_links(page), separators=(",", ":")),
        json.dumps(response_doc([page], [img("/x.jpg", "a caption here"),
                                         {"path": "IMG@/data-src", "url": "/lazy.jpg"}],
                                base=["/a/", "/b/"], warc_type=["response"]), separators=(",", ":")),
        json.dumps(response_doc(page, [img("/x.jpg", 'quote " and \\ backslash {"path":"IMG@/src"}')]),
                   separators=(",", ":"), ensure_ascii=False),
    ]
    assert len(texts) > 50
    for text in texts:
        assert _read_page_targeted(text) == _read_page_full(json.loads(text))
    trick = _read_page_targeted(texts[-3])
    assert trick is not None and [i["url"] for i in trick.images] == ["/real.jpg"] and trick.base == "/b/"


def test_unreadable_files_raise(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.wat.gz")
    with pytest.raises(WatReadError, match=r"missing\.wat\.gz"):
        extract_pairs([missing], crawl="c", segment="000")
    (tmp_path / "plain.wat").write_bytes(b"WARC/1.0\r\nWARC-Type: warcinfo\r\n\r\n")
    with pytest.raises(WatReadError, match=r"plain\.wat.*not gzip"):
        list(iter_wat_records(str(tmp_path / "plain.wat")))
    (tmp_path / "empty.wat.gz").write_bytes(b"")
    with pytest.raises(WatReadError, match=r"empty\.wat\.gz.*empty"):
        list(iter_wat_records(str(tmp_path / "empty.wat.gz")))
    (tmp_path / "nowarc.wat.gz").write_bytes(gzip.compress(b"hello, not WARC") * 3)
    with pytest.raises(WatReadError, match=r"nowarc\.wat\.gz.*no readable WARC record"):
        extract_pairs([str(tmp_path / "nowarc.wat.gz")], crawl="c", segment="000")


# ---------------------------------------------------------------------------------------------------
# Reader


def test_reader_matches_warcio(tmp_path: Path) -> None:
    from warcio.archiveiterator import ArchiveIterator

    path = tmp_path / "s.wat.gz"
    write_synthetic_wat(path, 30, seed=1)
    with open(path, "rb") as f:
        expected = []
        it = ArchiveIterator(f)
        for rec in it:
            payload = rec.content_stream().read()
            expected.append((rec.rec_type, it.get_record_offset(), payload))
    reader = WatReader(str(path))
    got = [(r.header("WARC-Type"), r.offset, r.payload) for r in reader]
    assert len(got) == 1 + 30 * 3
    assert got == expected
    assert reader.bytes_read == path.stat().st_size
    assert all(v == 0 for v in reader.problems.values())


def test_reader_spans_read_buffers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import curation.wat as wat

    path = tmp_path / "s.wat.gz"
    write_synthetic_wat(path, 20, seed=2)
    reference = [(r.offset, r.payload) for r in iter_wat_records(str(path))]
    monkeypatch.setattr(wat, "_READ_SIZE", 1000)  # members straddle many reads
    monkeypatch.setattr(wat, "_FEED_SIZE", 333)
    assert [(r.offset, r.payload) for r in iter_wat_records(str(path))] == reference


def test_fsspec_urls(tmp_path: Path) -> None:
    members = [warcinfo_member(), *page_members("https://ex.com/p.html", [img("/a.jpg", "a remote caption")])]
    write_wat(tmp_path / "x.wat.gz", members)
    local = extract_pairs([str(tmp_path / "x.wat.gz")], crawl="c", segment="000").table
    via_file = extract_pairs([f"file://{tmp_path / 'x.wat.gz'}"], crawl="c", segment="000").table
    memfs = fsspec.filesystem("memory")
    memfs.pipe("/bucket/crawl/x.wat.gz", b"".join(members))
    via_memory = extract_pairs(["memory://bucket/crawl/x.wat.gz"], crawl="c", segment="000")
    for table in (via_file, via_memory.table):
        assert table.drop_columns([R.WAT_FILE]).equals(local.drop_columns([R.WAT_FILE]))
    assert via_memory.table[R.WAT_FILE].to_pylist() == ["memory://bucket/crawl/x.wat.gz"]
    assert via_memory.bytes_read == len(b"".join(members))
    with pytest.raises(WatReadError, match="memory://bucket/nothing-here"):
        extract_pairs(["memory://bucket/nothing-here"], crawl="c", segment="000")


def test_synthetic_wat_is_deterministic_and_yields_pairs(tmp_path: Path) -> None:
    write_synthetic_wat(tmp_path / "a.wat.gz", 40, seed=3)
    write_synthetic_wat(tmp_path / "b.wat.gz", 40, seed=3)
    a = extract_pairs([str(tmp_path / "a.wat.gz")], crawl="c", segment="000")
    b = extract_pairs([str(tmp_path / "b.wat.gz")], crawl="c", segment="000")
    assert a.table[R.UID].to_pylist() == b.table[R.UID].to_pylist()
    assert a.counts["kept"] > 40
    assert a.counts[R.DROP_SVG] > 0 and a.counts[R.DROP_DUPLICATE] > 0 and a.counts[R.DROP_SHORT_ALT] > 0
    assert a.counts["pages"] == 40
