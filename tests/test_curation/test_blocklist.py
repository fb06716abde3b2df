"""Takedown list files, the append-only store and the crawl-time checks (curation.blocklist)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from curation import blocklist as B

SHA = "ab" * 32
MD5 = "cd" * 16


def test_text_list_is_normalised_and_urls_never_stored_in_clear() -> None:
    data = (b"# reason: reported by a hotline\n"
            b"url https://img.example.org/a b.jpg\n"  # a URL with a space is one value: refused below
            )
    with pytest.raises(B.ListError, match="line 2"):
        B.parse_list(data, "l.txt")
    entries, reason = B.parse_list(
        b"# reason: reported by a hotline\n"
        b"url https://img.example.org/a.jpg\n"
        b"image_sha256 " + SHA.upper().encode() + b"\n"
        b"phash 00FF00FF00FF00FF radius=4\n"
        b"host CDN.Example.COM.\n"
        b"uid 18446744073709551615\n"
        b"caption_keyword red  circle min_punsafe=0.5\n", "l.txt")
    assert reason == "reported by a hotline"
    assert [(e.kind, e.value, e.radius, e.min_punsafe) for e in entries] == [
        ("url_sha256", hashlib.sha256(b"https://img.example.org/a.jpg").hexdigest(), None, None),
        ("image_sha256", SHA, None, None),
        ("phash", "00ff00ff00ff00ff", 4, None),
        ("host", "cdn.example.com", None, None),
        ("uid", "-1", None, None),  # the unsigned spelling of a negative int64 (clip-retrieval's ids)
        ("caption_keyword", "red  circle", None, 0.5),
    ]


def test_csv_jsonl_and_value_only_lists() -> None:
    csv_entries, _ = B.parse_list(f"kind,value,radius\nphash,0123456789abcdef,3\nimage_md5,{MD5},\n".encode(), "l.csv")
    assert [(e.kind, e.radius) for e in csv_entries] == [("phash", 3), ("image_md5", None)]
    lines = [json.dumps({"kind": "host", "value": "example.net"}), json.dumps({"kind": "uid", "value": 7})]
    jsonl, _ = B.parse_list("\n".join(lines).encode(), "l.jsonl")
    assert [(e.kind, e.value) for e in jsonl] == [("host", "example.net"), ("uid", "7")]
    plain, _ = B.parse_list(f"{MD5}\n\n# a comment\n{'ef' * 16}\n".encode(), "hashes.txt", default_kind="image_md5")
    assert [e.value for e in plain] == [MD5, "ef" * 16]


@pytest.mark.parametrize("line, problem", [
    ("image_md5 zz", "32 hex digits"),
    ("phash 0123456789abcdef radius=40", "radius must be in"),
    ("image_sha256 " + SHA + " radius=2", "radius applies to phash"),
    ("caption_regex (unclosed", "invalid regular expression"),
    ("caption_keyword x min_punsafe=2", "min_punsafe must be in"),
    ("colour red", "unknown kind"),
    ("host exa mple.com", "expected `kind value"),
    ("uid 99999999999999999999999", "uid out of int64 range"),
])
def test_an_invalid_line_refuses_the_whole_list_naming_it(line: str, problem: str) -> None:
    data = f"image_md5 {MD5}\n{line}\n".encode()
    with pytest.raises(B.ListError, match=f"line 2: .*{problem}") as err:
        B.parse_list(data, "bad.txt")
    assert "nothing ingested" in str(err.value)


def test_non_utf8_and_empty_lists_are_refused() -> None:
    with pytest.raises(B.ListError, match="not UTF-8"):
        B.parse_list(b"\xff\xfe\x00", "x.txt")
    with pytest.raises(B.ListError, match="no entries"):
        B.parse_list(b"# only a comment\n", "x.txt")
    with pytest.raises(B.ListError, match="header with `kind` and `value`"):
        B.parse_list(b"a,b\n1,2\n", "x.csv")


def test_store_is_append_only_and_ingests_the_same_content_once(tmp_path: Path) -> None:
    lake = str(tmp_path / "lake")
    entries, _ = B.parse_list(f"image_md5 {MD5}\n".encode(), "a.txt")
    first, new = B.store_list(lake, entries, name="hotline", reason="r", source="a.txt", content_sha256="1")
    again, new_again = B.store_list(lake, entries, name="hotline", reason="r", source="a.txt", content_sha256="1")
    other, _ = B.store_list(lake, entries, name="hotline", reason="r", source="b.txt", content_sha256="2")
    assert (new, new_again, again.seq, other.seq) == (True, False, first.seq, first.seq + 1)
    files = sorted(p.name for p in (tmp_path / "lake" / "takedowns" / "lists").iterdir())
    assert files == ["000001-hotline.json", "000001-hotline.parquet", "000002-hotline.json", "000002-hotline.parquet"]
    assert B.entries(lake).num_rows == 2
    with pytest.raises(B.ListError, match="list name"):
        B.store_list(lake, entries, name="../escape", reason="r", source="a.txt", content_sha256="3")


def test_crawl_blocklist_refuses_by_url_host_uid_caption_and_image_hashes() -> None:
    blocked = B.CrawlBlocklist(
        url_sha256={B.url_sha256("https://a.org/x.jpg"): "urls"}, hosts={"example.com": "hosts"}, uids={42: "uids"},
        captions=(("words", "caption_keyword", "red circle"),), image_sha256={SHA: "sha"}, image_md5={MD5: "md5"},
        phash=((0x00FF, 2, "phash"),))
    assert blocked.refuse_pair(1, "https://a.org/x.jpg", "t") == "urls"
    assert blocked.refuse_pair(1, "https://a.org/y.jpg", "t") is None
    assert blocked.refuse_pair(1, "https://img.cdn.EXAMPLE.com./z.png", "t") == "hosts"
    assert blocked.refuse_pair(1, "https://notexample.com/z.png", "t") is None  # a suffix, not a subdomain
    assert blocked.refuse_pair(42, None, None) == "uids"
    assert blocked.refuse_pair(1, "https://b.org/1.jpg", "A RED   circle!") == "words"
    assert blocked.refuse_pair(1, "https://b.org/1.jpg", "a redcircle") is None  # whole words only
    assert blocked.refuse_image(sha256=SHA) == "sha"
    assert blocked.refuse_image(md5=MD5) == "md5"
    assert blocked.refuse_image(phash=0x00FC) == "phash"  # 2 bits away
    assert blocked.refuse_image(phash=0x00F0) is None  # 4 bits away
    assert blocked.refuse_image(phash=-1) is None  # int64 spelling of all ones: 56 bits away
    assert not blocked.empty and B.CrawlBlocklist().empty
