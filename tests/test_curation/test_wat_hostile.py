"""Hostile WAT input: each bad record ends as one count by reason, the pairs around it survive, memory is bounded.

Each case writes a WAT whose bad member sits between two good pages, plus a clean second WAT, and extracts both
in one call: the hostile file's counts must name exactly the expected reasons, and every good pair must come
out. Memory-heavy cases run in a child process that reports how far its peak RSS (VmHWM, reset after a warm-up
extraction) rose above its RSS before the case, so the bound is that of the extraction alone.
"""

from __future__ import annotations

import gzip
import json
import random
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

import curation.wat as wat
from curation import records as R
from curation.wat import (
    DROP_REASONS,
    INPUT_REASONS,
    MAX_RECORD_BYTES,
    TOTALS,
    ExtractConfig,
    ExtractResult,
    WatReadError,
    extract_pairs,
    iter_wat_records,
    resolve_image_url,
)
from tests.test_curation.test_wat import img, metadata_member, page_members, response_doc, warcinfo_member, write_wat

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
PAGE = "https://ex.com/hostile.html"
BEFORE, AFTER, OTHER = "the caption of before", "the caption of after", "the caption of other"
GOOD_LINK = "the good link of the page"
VICTIM = "the victim link of the page"


# ---------------------------------------------------------------------------------------------------
# Building hostile files


def _page(tag: str) -> list[bytes]:
    return page_members(f"https://ex.com/{tag}.html", [img(f"/{tag}.jpg", f"the caption of {tag}")])


def _write(tmp_path: Path, bad: Sequence[bytes], *, tail: bool = True) -> tuple[str, str, list[int]]:
    """A WAT with `bad` between two good pages (at its very end when not `tail`) and a clean second WAT;
    returns both paths and the hostile file's member offsets."""
    hostile, clean = tmp_path / "hostile.warc.wat.gz", tmp_path / "clean.warc.wat.gz"
    offsets = write_wat(hostile, [warcinfo_member(), *_page("before"), *bad, *(_page("after") if tail else [])])
    write_wat(clean, [warcinfo_member(), *_page("other")])
    return str(hostile), str(clean), offsets


DEFAULT = ExtractConfig()


def _extract(tmp_path: Path, bad: Sequence[bytes], config: ExtractConfig = DEFAULT) -> tuple[ExtractResult, str, str]:
    hostile, clean, _ = _write(tmp_path, bad)
    return extract_pairs([hostile, clean], crawl="c", segment="000", config=config), hostile, clean


def _reasons(counts: Mapping[str, int]) -> dict[str, int]:
    """The reasons a count dict names (totals left out)."""
    return {k: v for k, v in counts.items() if v and k not in TOTALS}


def _check(result: ExtractResult, hostile: str, clean: str, reasons: dict[str, int],
           kept_inside: Sequence[str] = ()) -> None:
    """The hostile file names exactly `reasons`; the good pages of both files and `kept_inside` (pairs of the
    hostile record itself) all came out, in file order."""
    assert _reasons(result.per_file[hostile]) == reasons
    assert _reasons(result.per_file[clean]) == {}
    assert result.table[R.TEXT].to_pylist() == [BEFORE, *kept_inside, AFTER, OTHER]


def _compact(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"))


def _text_member(text: str | bytes) -> bytes:
    return metadata_member(None, PAGE, payload=text.encode() if isinstance(text, str) else text)


def _two_links() -> dict[str, Any]:
    return response_doc(PAGE, [img("/good.jpg", GOOD_LINK), img("/victim.jpg", VICTIM)])


_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"


def _bomb(mib: int) -> bytes:
    """A valid gzip member of `mib` MiB of zeros in about 1 KiB per MiB: full flushes make every MiB compress
    to the same self-contained bytes, so building 1 GiB costs one CRC pass."""
    zeros = bytes(MiB)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    return _GZIP_HEADER + block * mib + deflate.flush() + struct.pack("<II", crc, (mib * MiB) & 0xFFFFFFFF)


def _comment_member(n: int) -> bytes:
    """A valid gzip member whose header carries an `n`-byte comment: it spans `n` bytes, inflates to ~60."""
    record = b"WARC/1.0\r\nWARC-Type: metadata\r\nContent-Length: 0\r\n\r\n"
    deflate = zlib.compressobj(6, zlib.DEFLATED, -15)
    body = deflate.compress(record) + deflate.flush()
    header = b"\x1f\x8b\x08\x10" + _GZIP_HEADER[4:]  # FLG.FCOMMENT
    return header + b"c" * n + b"\x00" + body + struct.pack("<II", zlib.crc32(record), len(record))


def _noise(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# ---------------------------------------------------------------------------------------------------
# Records that must become one count each


def _nested(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "array" else '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("depth", [1_100, 100_000])
@pytest.mark.parametrize("kind", ["array", "object"])
@pytest.mark.parametrize("reader", ["targeted", "full parse"])
def test_deep_nesting_is_one_count_not_a_recursion_error(tmp_path: Path, depth: int, kind: str, reader: str) -> None:
    # "alt" before "path" is a layout only json.loads reads; the targeted reader decodes the usual one itself
    link = ({"path": "IMG@/src", "url": "@@", "alt": "a deep caption here"} if reader == "targeted"
            else {"alt": "a deep caption here", "path": "IMG@/src", "url": "@@"})
    text = _compact(response_doc(PAGE, [link])).replace('"@@"', _nested(depth, kind))
    member = _text_member(text)
    if depth == 1_100:
        assert len(member) < 1_500  # the defect's size: a ~1.2 KB record took the whole call down
    result, hostile, clean = _extract(tmp_path, [member])
    _check(result, hostile, clean, {R.JSON_TOO_DEEP: 1})


@pytest.mark.parametrize("keep", [1, 3, 10, 0.5, -4], ids=["magic byte", "magic", "header", "half", "no size"])
def test_a_member_cut_short_is_one_count(tmp_path: Path, keep: float) -> None:
    member = _text_member(_compact(_two_links()))
    cut = int(len(member) * keep) if isinstance(keep, float) else keep % len(member)
    hostile, clean, _ = _write(tmp_path, [member[:cut]], tail=False)
    result = extract_pairs([hostile, clean], crawl="c", segment="000")
    assert _reasons(result.per_file[hostile]) == {R.TRUNCATED_FILE: 1}
    assert result.table[R.TEXT].to_pylist() == [BEFORE, OTHER]


def _flipped() -> bytes:
    bad = bytearray(_text_member(_compact(_two_links())))
    for i in range(20, len(bad) - 20, 7):
        bad[i] ^= 0x5A
    return bytes(bad)


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"\x1f\x8b\x08" + _noise(10_000), id="magic then noise"),
        pytest.param(_noise(10_000, seed=1), id="noise"),
        pytest.param(_GZIP_HEADER + bytes(10_000), id="header then zeros"),
        pytest.param(b"\x1f\x8b\x08" * 1_000, id="magic repeated"),
        pytest.param(_flipped(), id="flipped bits"),
    ],
)
def test_a_garbage_member_is_one_count(tmp_path: Path, garbage: bytes) -> None:
    result, hostile, clean = _extract(tmp_path, [garbage])
    _check(result, hostile, clean, {R.BAD_GZIP_MEMBER: 1})


_VALID = _compact(_two_links())
_CUT = _VALID[: _VALID.index('"path":"IMG@/src"') + 30]  # past the pre-filter's "IMG@", inside the first link


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(_CUT, id="cut short"),
        pytest.param(_VALID.replace('"/victim.jpg"', "/victim.jpg"), id="unquoted string"),
        pytest.param(_VALID.replace('"url":', '"url"'), id="missing colon"),
        pytest.param(repr(_two_links()), id="python repr"),
        pytest.param(_VALID.replace('"/victim.jpg"', '"/victim.jpg","width":' + "9" * 5_000), id="5000 digits"),
        pytest.param("IMG@", id="not JSON"),
        pytest.param("12 IMG@", id="two values"),
    ],
)
def test_invalid_json_is_one_count(tmp_path: Path, payload: str) -> None:
    result, hostile, clean = _extract(tmp_path, [_text_member(payload)])
    _check(result, hostile, clean, {R.BAD_JSON: 1})


def _html(doc: dict[str, Any]) -> dict[str, Any]:
    html: dict[str, Any] = doc["Envelope"]["Payload-Metadata"]["HTTP-Response-Metadata"]["HTML-Metadata"]
    return html


def _victim(doc: dict[str, Any]) -> dict[str, Any]:
    link: dict[str, Any] = _html(doc)["Links"][1]
    return link


def _warc(doc: dict[str, Any]) -> dict[str, Any]:
    warc: dict[str, Any] = doc["Envelope"]["WARC-Header-Metadata"]
    return warc


Mutation = Callable[[dict[str, Any]], object]
WHOLE_RECORD = {R.BAD_RECORD: 1}
WRONG_TYPES: list[tuple[str, Mutation, dict[str, int], tuple[str, ...]]] = [
    ("Links an object", lambda d: _html(d).update(Links=_victim(d)), WHOLE_RECORD, ()),
    ("Links a string", lambda d: _html(d).update(Links="IMG@/src"), WHOLE_RECORD, ()),
    ("url a number", lambda d: _victim(d).update(url=5), {R.BAD_RECORD: 1}, (GOOD_LINK,)),
    ("url null", lambda d: _victim(d).update(url=None), {R.BAD_RECORD: 1}, (GOOD_LINK,)),
    ("url a list", lambda d: _victim(d).update(url=["/victim.jpg"]), {R.BAD_RECORD: 1}, (GOOD_LINK,)),
    ("url an object", lambda d: _victim(d).update(url={"href": "/v.jpg"}), {R.BAD_RECORD: 1}, (GOOD_LINK,)),
    ("url missing", lambda d: _victim(d).pop("url"), {R.BAD_RECORD: 1}, (GOOD_LINK,)),
    # a non-string alt is no alt at all, as a missing one
    ("alt a number", lambda d: _victim(d).update(alt=12345), {R.DROP_SHORT_ALT: 1}, (GOOD_LINK,)),
    ("alt an object", lambda d: _victim(d).update(alt={"t": VICTIM}), {R.DROP_SHORT_ALT: 1}, (GOOD_LINK,)),
    ("Envelope a string", lambda d: d.update(Envelope="IMG@/src"), WHOLE_RECORD, ()),
    ("WARC header a list", lambda d: d["Envelope"].update({"WARC-Header-Metadata": [_warc(d)]}), WHOLE_RECORD, ()),
    ("WARC-Target-URI a number", lambda d: _warc(d).update({"WARC-Target-URI": 7}), WHOLE_RECORD, ()),
    ("WARC-Type a number", lambda d: _warc(d).update({"WARC-Type": 7}), WHOLE_RECORD, ()),
    ("WARC-Type missing", lambda d: _warc(d).pop("WARC-Type"), WHOLE_RECORD, ()),
    ("Payload-Metadata a string", lambda d: d["Envelope"].update({"Payload-Metadata": "IMG@"}), WHOLE_RECORD, ()),
    ("HTML-Metadata a list",
     lambda d: d["Envelope"]["Payload-Metadata"]["HTTP-Response-Metadata"].update({"HTML-Metadata": [_html(d)]}),
     WHOLE_RECORD, ()),
    # read as usual: the targeted reader finds its keys by name, so a wrong shape above them goes unnoticed
    ("Envelope a list", lambda d: d.update(Envelope=[d["Envelope"]]), {}, (GOOD_LINK, VICTIM)),
    # ignored, not counted: a non-string date or base is read as missing
    ("WARC-Date a number", lambda d: _warc(d).update({"WARC-Date": 7}), {}, (GOOD_LINK, VICTIM)),
    ("Base a number", lambda d: _html(d)["Head"].update(Base=7), {}, (GOOD_LINK, VICTIM)),
]


@pytest.mark.parametrize(("mutate", "reasons", "kept_inside"), [pytest.param(*case[1:], id=case[0])
                                                                for case in WRONG_TYPES])
def test_wrong_json_types_are_counted(tmp_path: Path, mutate: Mutation, reasons: dict[str, int],
                                      kept_inside: tuple[str, ...]) -> None:
    doc = _two_links()
    mutate(doc)
    result, hostile, clean = _extract(tmp_path, [_text_member(_compact(doc))])
    _check(result, hostile, clean, reasons, kept_inside)


@pytest.mark.parametrize("document", ['["IMG@/src"]', '"IMG@/src"', '{"IMG@/src":1}', '{"Envelope":"IMG@"}'])
def test_a_document_of_the_wrong_shape_is_one_count(tmp_path: Path, document: str) -> None:
    result, hostile, clean = _extract(tmp_path, [_text_member(document)])
    _check(result, hostile, clean, {R.BAD_RECORD: 1})


@pytest.mark.parametrize("entry", ["IMG@/src", ["IMG@/src", "/v.jpg"], None, 7])
def test_a_link_that_is_not_an_object(tmp_path: Path, entry: Any) -> None:
    # Not an image link. The targeted reader reads only `{"path":"IMG@/src"…}` objects, so it skips the entry
    # like an anchor; when the page needs the full parse (here: one link with "alt" before "path"), every
    # non-object entry is counted as a malformed record.
    doc = _two_links()
    _html(doc)["Links"][1] = entry
    result, hostile, clean = _extract(tmp_path, [_text_member(_compact(doc))])
    _check(result, hostile, clean, {}, (GOOD_LINK,))
    _html(doc)["Links"].append({"alt": "read by the full parse", "path": "IMG@/src", "url": "/full.jpg"})
    result, hostile, clean = _extract(tmp_path, [_text_member(_compact(doc))])
    _check(result, hostile, clean, {R.BAD_RECORD: 1}, (GOOD_LINK, "read by the full parse"))


def _with(field: str, value: str) -> bytes:
    doc = _two_links()
    if field == "page":
        _warc(doc)["WARC-Target-URI"] = value
    elif field == "date":
        _warc(doc)["WARC-Date"] = value
    else:
        _victim(doc)[field] = value
    return json.dumps(doc).encode()  # ensure_ascii: a lone surrogate is written as a valid "\udXXX" escape


_ACCENTED = json.dumps(_two_links() | {"Title": "café crème"}, ensure_ascii=False)


@pytest.mark.parametrize(
    ("payload", "reasons", "kept_inside"),
    [
        pytest.param(_ACCENTED.encode("latin-1"), {R.BAD_ENCODING: 1}, (), id="latin-1 bytes"),
        pytest.param(_VALID.encode().replace(b"good link", b"good\xff\xfelink"), {R.BAD_ENCODING: 1}, (),
                     id="invalid bytes"),
        pytest.param(_VALID.encode().replace(b"good link", b"good \xed\xa0\x80 link"), {R.BAD_ENCODING: 1}, (),
                     id="encoded surrogate"),
        # valid JSON whose strings pyarrow cannot store: these used to raise when the table was built
        pytest.param(_with("page", "https://ex.com/p\ud800.html"), {R.BAD_ENCODING: 1}, (), id="surrogate page"),
        pytest.param(_with("date", "2024-12-03T12:34:56Z\udc80"), {R.BAD_ENCODING: 1}, (), id="surrogate date"),
        pytest.param(_with("url", "/v\ud800.jpg"), {R.BAD_ENCODING: 1}, (GOOD_LINK,), id="surrogate image url"),
        pytest.param(_with("url", "https://ex.com/v\ud800.jpg"), {R.BAD_ENCODING: 1}, (GOOD_LINK,),
                     id="surrogate absolute url"),
        # ftfy replaces a lone surrogate in text with U+FFFD, which is valid UTF-8
        pytest.param(_with("alt", "the victim \ud800 link"), {}, (GOOD_LINK, "the victim \ufffd link"),
                     id="surrogate alt"),
    ],
)
def test_non_utf8_is_counted(tmp_path: Path, payload: bytes, reasons: dict[str, int],
                             kept_inside: tuple[str, ...]) -> None:
    result, hostile, clean = _extract(tmp_path, [_text_member(payload)])
    _check(result, hostile, clean, reasons, kept_inside)


@pytest.mark.parametrize("src", ["", " ", "\t\r\n", "\x00\x1f "])
def test_an_empty_src_is_dropped_not_turned_into_the_page_url(tmp_path: Path, src: str) -> None:
    doc = response_doc(PAGE, [img("/good.jpg", GOOD_LINK), img(src, "an image without a source")])
    result, hostile, clean = _extract(tmp_path, [_text_member(_compact(doc))])
    _check(result, hostile, clean, {R.DROP_EMPTY_SRC: 1}, (GOOD_LINK,))
    assert PAGE not in result.table[R.URL].to_pylist()
    assert resolve_image_url(PAGE, "https://cdn.ex.org/", src, ExtractConfig()) == (None, R.DROP_EMPTY_SRC)


def _warc_member(payload: bytes, content_length: str) -> bytes:
    head = f"WARC/1.0\r\nWARC-Type: metadata\r\nWARC-Target-URI: {PAGE}\r\nContent-Length: {content_length}\r\n\r\n"
    return gzip.compress(head.encode() + payload + b"\r\n\r\n")


@pytest.mark.parametrize("declared", ["-1 byte", "-40 bytes", "+40 bytes", "-5", "forty", ""])
def test_a_wrong_content_length_is_one_count(tmp_path: Path, declared: str) -> None:
    payload = _VALID.encode()
    if declared.endswith(("byte", "bytes")):
        declared = str(len(payload) + int(declared.split()[0]))
    hostile, clean, written = _write(tmp_path, [_warc_member(payload, declared)])
    result = extract_pairs([hostile, clean], crawl="c", segment="000")
    _check(result, hostile, clean, {R.BAD_RECORD: 1})  # not malformed_json as well for the cut-off block
    problems: list[tuple[str, int]] = []
    offsets = [r.offset for r in iter_wat_records(hostile, on_problem=lambda *p: problems.append(p))]
    assert problems == [(R.BAD_RECORD, written[4])]
    assert offsets == written[:4] + written[5:]


# ---------------------------------------------------------------------------------------------------
# Members over the cap


CAP = 1 * MiB
OVER_CAP: list[tuple[str, Callable[[], bytes]]] = [
    ("2 MiB record", lambda: _text_member(_compact(response_doc(PAGE, [img("/big.jpg", GOOD_LINK)],
                                                                title="t" * 2 * MiB)))),
    ("8 MiB of zeros in 8 KiB", lambda: _bomb(8)),
    ("2 MiB gzip comment", lambda: _comment_member(2 * MiB)),
    ("2 MiB stored", lambda: gzip.compress(b"WARC/1.0\r\nContent-Length: 0\r\n\r\n" + _noise(2 * MiB),
                                           compresslevel=0)),
]


@pytest.mark.parametrize("read_size", [None, 64 << 10], ids=["one read", "many reads"])
@pytest.mark.parametrize("build", [pytest.param(b, id=name) for name, b in OVER_CAP])
def test_a_member_over_the_cap_is_one_count_and_the_next_is_found_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, build: Callable[[], bytes], read_size: int | None
) -> None:
    if read_size:
        monkeypatch.setattr(wat, "_READ_SIZE", read_size)  # the member spans many reads of the file
    hostile, clean, written = _write(tmp_path, [build()])
    result = extract_pairs([hostile, clean], crawl="c", segment="000", config=ExtractConfig(max_record_bytes=CAP))
    _check(result, hostile, clean, {R.RECORD_TOO_LARGE: 1})
    problems: list[tuple[str, int]] = []
    offsets = [r.offset for r in iter_wat_records(hostile, on_problem=lambda *p: problems.append(p),
                                                  max_record_bytes=CAP)]
    assert problems == [(R.RECORD_TOO_LARGE, written[4])]
    assert offsets == written[:4] + written[5:]


def test_the_cap_is_on_the_inflated_member(tmp_path: Path) -> None:
    member = _text_member(_compact(response_doc(PAGE, [img("/edge.jpg", "right at the edge")], title="t" * 9_000)))
    size = len(gzip.decompress(member))
    result, hostile, clean = _extract(tmp_path, [member], ExtractConfig(max_record_bytes=size))
    _check(result, hostile, clean, {}, ("right at the edge",))
    result, hostile, clean = _extract(tmp_path, [member], ExtractConfig(max_record_bytes=size - 1))
    _check(result, hostile, clean, {R.RECORD_TOO_LARGE: 1})
    with pytest.raises(ValueError, match="max_record_bytes"):
        ExtractConfig(max_record_bytes=0)


# ---------------------------------------------------------------------------------------------------
# Memory, measured in a child process

_CHILD = r"""
import json, sys
from curation.wat import ExtractConfig, extract_pairs

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

args = json.loads(sys.argv[1])
extract_pairs([args["warmup"]], crawl="c", segment="000")  # imports, ftfy and cld2 tables: not the case's cost
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
except OSError:
    pass  # the growth then includes the warm-up's own peak: looser, never lower than the truth
baseline = status("VmRSS:")
result = extract_pairs(args["paths"], crawl="c", segment="000", config=ExtractConfig(**args["config"]))
print(json.dumps({"texts": result.table.column("text").to_pylist(), "per_file": result.per_file,
                  "growth": status("VmHWM:") - baseline}))
"""


def _extract_in_child(paths: list[str], warmup: str, **config: int) -> dict[str, Any]:
    """Extract in a fresh interpreter; returns its texts, per-file counts and peak RSS growth in bytes."""
    args = json.dumps({"paths": paths, "warmup": warmup, "config": config})
    done = subprocess.run([sys.executable, "-c", _CHILD, args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@pytest.mark.parametrize(
    "build",
    [pytest.param(lambda: _bomb(1024), id="1 MB inflating to 1 GiB"),
     pytest.param(lambda: _comment_member(100 * MiB), id="100 MiB gzip comment")],
)
def test_a_bomb_is_refused_in_bounded_memory(tmp_path: Path, build: Callable[[], bytes]) -> None:
    hostile, clean, _ = _write(tmp_path, [build()])
    report = _extract_in_child([hostile, clean], clean)
    assert _reasons(report["per_file"][hostile]) == {R.RECORD_TOO_LARGE: 1}
    assert report["texts"] == [BEFORE, AFTER, OTHER]
    # measured: 33 MB (bomb; 3.9 GB before the cap) and 38 MB (comment)
    assert report["growth"] < MAX_RECORD_BYTES + 16 * MiB, report["growth"]


@pytest.mark.parametrize("cap", [MAX_RECORD_BYTES, 64 * MiB], ids=["default cap", "64 MiB cap"])
def test_a_fifty_megabyte_record(tmp_path: Path, cap: int) -> None:
    size = 50 * MiB
    doc = response_doc(PAGE, [img("/big.jpg", GOOD_LINK)], title="t" * size)
    hostile, clean, _ = _write(tmp_path, [_text_member(_compact(doc))])
    report = _extract_in_child([hostile, clean], clean, max_record_bytes=cap)
    if cap < size:  # refused: it costs what the cap allows and no more (measured: 32 MB)
        assert _reasons(report["per_file"][hostile]) == {R.RECORD_TOO_LARGE: 1}
        assert report["texts"] == [BEFORE, AFTER, OTHER]
        assert report["growth"] < cap + 16 * MiB, report["growth"]
    else:  # read: inflated bytes, payload copy, text, decoded title (measured: 201 MB)
        assert _reasons(report["per_file"][hostile]) == {}
        assert report["texts"] == [BEFORE, GOOD_LINK, AFTER, OTHER]
        assert report["growth"] < 5 * size, report["growth"]


@pytest.mark.parametrize("reader", ["targeted", "full parse"])
def test_a_page_with_a_million_links(tmp_path: Path, reader: str) -> None:
    # 1,000,000 image links, one in 10,000 with a caption: 31 MB of JSON, just under the default cap
    plain = ",".join(['{"path":"IMG@/src","url":"/i"}'] * 9_999)
    captions = [f"caption number {i} of the big page" for i in range(100)]
    links = [f'{plain},{{"path":"IMG@/src","url":"/img/{i}.jpg","alt":"{c}"}}' for i, c in enumerate(captions)]
    if reader == "full parse":  # "alt" before "path" in the last link: the page goes to json.loads
        links[-1] = f'{plain},{{"alt":"{captions[-1]}","path":"IMG@/src","url":"/img/99.jpg"}}'
    text = _compact(response_doc(PAGE, [])).replace('"Links":[]', '"Links":[' + ",".join(links) + "]")
    assert MAX_RECORD_BYTES - 4 * MiB < len(text) < MAX_RECORD_BYTES
    hostile, clean, _ = _write(tmp_path, [_text_member(text)])
    report = _extract_in_child([hostile, clean], clean)
    counts = report["per_file"][hostile]
    assert _reasons(counts) == {R.DROP_SHORT_ALT: 999_900}
    assert (counts["image_links"], counts["kept"]) == (1_000_002, 102)
    assert report["texts"] == [BEFORE, *captions, AFTER, OTHER]
    # measured: 0.53 GB (targeted: one dict per image link) and 0.92 GB (json.loads of the whole page), which is
    # why the cap is 32 MiB and not more
    bound = 640 * MiB if reader == "targeted" else 1024 * MiB
    assert report["growth"] < bound, report["growth"]


# ---------------------------------------------------------------------------------------------------
# Files that cannot be read at all: one error naming the file and what to do


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"", r"is empty \(0 bytes\).*Fetch it anew", id="empty"),
        pytest.param(b"<html><body>404 Not Found</body></html>",
                     r"is not gzip \(starts with b'<html><b'\).*Check the path", id="html error page"),
        pytest.param(b"WARC/1.0\r\nWARC-Type: warcinfo\r\n\r\n", r"is not gzip.*Check the path", id="not compressed"),
        pytest.param(gzip.compress(b"hello, not WARC") * 3,
                     r"no readable WARC record \(malformed_record=3\).*Fetch it anew", id="gzip but not WARC"),
        pytest.param(b"\x1f\x8b" + _noise(5_000), r"no readable WARC record \(corrupt_gzip_member=1\).*Fetch it anew",
                     id="gzip magic then noise"),
        pytest.param(_bomb(40), r"no readable WARC record \(record_too_large=1\).*Fetch it anew", id="only a bomb"),
        pytest.param("directory", r"cannot open WAT file.*Check that the path or URL exists", id="a directory"),
        pytest.param("missing", r"cannot open WAT file.*Check that the path or URL exists", id="missing"),
    ],
)
def test_an_unreadable_file_is_one_actionable_error(tmp_path: Path, content: bytes | str, message: str) -> None:
    _, clean, _ = _write(tmp_path, [])
    bad = tmp_path / "bad.warc.wat.gz"
    if content == "directory":
        bad.mkdir()
    elif isinstance(content, bytes):
        bad.write_bytes(content)
    with pytest.raises(WatReadError, match=message) as raised:
        extract_pairs([clean, str(bad)], crawl="c", segment="000")
    assert repr(str(bad)) in str(raised.value)  # the file to act on, and not the good one before it
    assert clean not in str(raised.value)


# ---------------------------------------------------------------------------------------------------
# All of it at once


def test_every_bad_record_counts_once_in_one_file(tmp_path: Path) -> None:
    deep = _compact(response_doc(PAGE, [img("/d.jpg", "a deep caption")])).replace('"/d.jpg"', _nested(5_000, "array"))
    no_uri = _two_links()
    _warc(no_uri)["WARC-Target-URI"] = 7
    empty_src = response_doc(PAGE, [img(" ", "a caption without a source")])
    bad = [
        _text_member(deep),
        _text_member(_CUT),
        _text_member(_ACCENTED.encode("latin-1")),
        _text_member(_compact(no_uri)),
        _text_member(_compact(empty_src)),
        _warc_member(_VALID.encode(), str(len(_VALID) - 10)),
        _noise(3_000, seed=2),
        _bomb(3),
        *_page("inside"),
    ]
    hostile, clean, _ = _write(tmp_path, bad)
    config = ExtractConfig(max_record_bytes=2 * MiB)
    result = extract_pairs([hostile, clean], crawl="c", segment="000", config=config)
    assert _reasons(result.per_file[hostile]) == {
        R.JSON_TOO_DEEP: 1, R.BAD_JSON: 1, R.BAD_ENCODING: 1, R.BAD_RECORD: 2, R.DROP_EMPTY_SRC: 1,
        R.BAD_GZIP_MEMBER: 1, R.RECORD_TOO_LARGE: 1,
    }
    assert result.table[R.TEXT].to_pylist() == [BEFORE, "the caption of inside", AFTER, OTHER]
    # every count a stats file carries, in every file's counts too, each key once
    keys = (*TOTALS, *INPUT_REASONS, *DROP_REASONS)
    assert len(set(keys)) == len(keys)
    assert {R.JSON_TOO_DEEP, R.RECORD_TOO_LARGE} <= set(INPUT_REASONS) and R.DROP_EMPTY_SRC in DROP_REASONS
    assert list(result.counts) == list(keys)
    assert all(list(counts) == list(keys) for counts in result.per_file.values())
    assert result.counts == {k: sum(c[k] for c in result.per_file.values()) for k in keys}
