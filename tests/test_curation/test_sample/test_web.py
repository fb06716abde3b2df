"""The sample web: deterministic per seed, genuine Common Crawl WAT layout, and consistent truth."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections import Counter
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import ftfy
import imagehash
import jsonschema
import numpy as np
import pytest
from PIL import Image
from warcio.archiveiterator import ArchiveIterator

from curation.sample.web import (
    HTTP_BEHAVIOURS,
    TRUTH_COLUMNS,
    SampleWebConfig,
    generate_sample_web,
    shrink,
    training_corpus,
)
from tests.conftest import SMALL, SampleWeb

HEADER_VALUE = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]}
# The Common Crawl WAT envelope (ia-web-commons), as far as extraction and provenance rely on it.
WAT_SCHEMA = {
    "type": "object",
    "required": ["Container", "Envelope"],
    "properties": {
        "Container": {
            "type": "object",
            "required": ["Filename", "Compressed", "Offset", "Gzip-Metadata"],
            "properties": {"Offset": {"type": "string", "pattern": "^[0-9]+$"}},
        },
        "Envelope": {
            "type": "object",
            "required": ["Format", "WARC-Header-Metadata", "Payload-Metadata"],
            "properties": {
                "Format": {"const": "WARC"},
                "WARC-Header-Metadata": {
                    "type": "object",
                    "required": ["WARC-Type", "WARC-Date", "WARC-Record-ID"],
                    "additionalProperties": HEADER_VALUE,
                    "properties": {"WARC-Type": {"enum": ["request", "response", "metadata", "warcinfo"]}},
                },
                "Payload-Metadata": {
                    "type": "object",
                    "required": ["Actual-Content-Type"],
                    "properties": {
                        "HTTP-Response-Metadata": {
                            "type": "object",
                            "required": ["Response-Message", "Headers", "HTML-Metadata"],
                            "properties": {
                                "Headers": {"type": "object", "additionalProperties": HEADER_VALUE},
                                "Response-Message": {"type": "object", "required": ["Status", "Version", "Reason"]},
                                "HTML-Metadata": {
                                    "type": "object",
                                    "required": ["Head", "Links"],
                                    "properties": {
                                        "Head": {"type": "object", "properties": {"Base": {"type": "string"}}},
                                        "Links": {
                                            "type": "array",
                                            "items": {
                                                "type": "object",
                                                "required": ["path", "url"],
                                                "properties": {
                                                    "path": {"type": "string", "pattern": "^[A-Z]+@/"},
                                                    "url": {"type": "string"},
                                                    "alt": {"type": "string"},
                                                },
                                            },
                                        },
                                    },
                                },
                            },
                        }
                    },
                },
            },
        },
    },
}


def _wat_records(path: Path) -> list[tuple[str, dict[str, str], bytes]]:
    with open(path, "rb") as f:
        return [(r.rec_type, dict(r.rec_headers.headers), r.content_stream().read()) for r in ArchiveIterator(f)]


def test_same_seed_gives_identical_output_and_another_seed_does_not(sample_web: SampleWeb, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_sample_web(again, sample_web.config)
    for rel in ["truth.parquet", *sample_web.manifest["wat_files"]]:  # type: ignore[misc]
        assert (again / rel).read_bytes() == (sample_web.root / rel).read_bytes(), rel
    other = tmp_path / "other"
    generate_sample_web(other, SampleWebConfig(**{**SMALL, "seed": 8, "pages": 10}))  # type: ignore[arg-type]
    assert (other / "truth.parquet").read_bytes() != (sample_web.root / "truth.parquet").read_bytes()


def test_crawl_layout_and_listings(sample_web: SampleWeb) -> None:
    crawl = sample_web.config.crawl
    root = sample_web.root / "crawl-data" / crawl
    wat_paths = gzip.decompress((root / "wat.paths.gz").read_bytes()).decode().split()
    segs = gzip.decompress((root / "segment.paths.gz").read_bytes()).decode().split()
    assert len(segs) == 2 and len(wat_paths) == 4
    for p in wat_paths:
        parts = p.split("/")
        assert parts[:3] == ["crawl-data", crawl, "segments"] and parts[4] == "wat", p
        assert parts[5].startswith("CC-MAIN-") and parts[5].endswith(".warc.wat.gz")
        assert (sample_web.root / p).is_file()
    # One gzip member per record, as Common Crawl writes them.
    data = (sample_web.root / wat_paths[0]).read_bytes()
    assert data.count(b"\x1f\x8b\x08") >= len(_wat_records(sample_web.root / wat_paths[0]))


def test_wat_files_read_by_warcio_and_match_the_common_crawl_schema(sample_web: SampleWeb) -> None:
    pages = 0
    list_valued = 0
    for rel in sample_web.manifest["wat_files"]:  # type: ignore[union-attr]
        recs = _wat_records(sample_web.root / rel)
        assert recs[0][0] == "warcinfo"
        for rec_type, headers, body in recs[1:]:
            assert rec_type == "metadata" and headers["Content-Type"] == "application/json"
            doc = json.loads(body)
            jsonschema.validate(doc, WAT_SCHEMA)
            meta = doc["Envelope"]["WARC-Header-Metadata"]
            assert meta["WARC-Target-URI"] == headers["WARC-Target-URI"]
            if meta["WARC-Type"] == "response":
                pages += 1
                http = doc["Envelope"]["Payload-Metadata"]["HTTP-Response-Metadata"]
                list_valued += any(isinstance(v, list) for v in http["Headers"].values())
    assert pages == sample_web.config.pages
    assert 0 < list_valued < pages  # both the pre- and post-CC-MAIN-2024-51 header formats occur


def test_truth_urls_are_the_resolved_links_of_the_wat_pages(sample_web: SampleWeb) -> None:
    """Every extractable truth URL is what urljoin(urljoin(page, base), src) gives for some IMG@/src link."""
    resolved: dict[str, set[str]] = {}
    for rel in sample_web.manifest["wat_files"]:  # type: ignore[union-attr]
        for rec_type, _, body in _wat_records(sample_web.root / rel):
            if rec_type != "metadata":
                continue
            env = json.loads(body)["Envelope"]
            http = env["Payload-Metadata"].get("HTTP-Response-Metadata")
            if not http:
                continue
            page = env["WARC-Header-Metadata"]["WARC-Target-URI"]
            base = http["HTML-Metadata"]["Head"].get("Base", "")
            for link in http["HTML-Metadata"]["Links"]:
                if link["path"] == "IMG@/src":
                    url = urljoin(urljoin(page, base), link["url"]).replace(" ", "%20")
                    resolved.setdefault(url, set()).add(link.get("alt", ""))
    truth = sample_web.truth()
    extractable = [r for r in truth if r["extract"]]
    assert {r["url"] for r in extractable} <= set(resolved)
    forms = Counter(r["link_form"] for r in extractable)
    for form in ("absolute", "relative", "root_relative", "protocol_relative", "base_relative"):
        assert forms[form] > 0, form
    assert any(r["src"].startswith("../") for r in extractable)


def test_truth_has_every_planted_case(sample_web: SampleWeb) -> None:
    truth = sample_web.truth()
    assert tuple(truth[0]) == TRUTH_COLUMNS
    links = sample_web.manifest["image_links"]
    assert 450 <= links <= 700  # type: ignore[operator]
    ext = [r for r in truth if r["extract"]]
    assert Counter(r["http_behavior"] for r in ext).keys() == HTTP_BEHAVIOURS.keys()
    assert Counter(r["exclude_reason"] for r in truth if not r["extract"]).keys() >= {
        "svg",
        "gif",
        "short_alt",
        "url_too_long",
        "unsupported_scheme",
    }
    assert {r["language"] for r in ext} == {"en", "de", "fr", "es"}
    assert 0.05 < sum(not r["caption_matches"] for r in ext) / len(ext) < 0.25
    assert any(r["watermark"] for r in ext) and any(r["unsafe"] for r in ext)
    assert all(r["concept"] == "hazard" for r in ext if r["unsafe"])
    high_res = [r for r in ext if r["expect_status"] == "success" and (r["width"] or 0) >= 1024 <= (r["height"] or 0)]
    assert len(high_res) >= 5
    assert any(r["occurrences"] > 1 for r in ext)
    kinds = Counter(r["dup_kind"] for r in ext if r["dup_group"] is not None)
    assert {"original", "exact", "resized", "cropped", "reencoded", "recompressed"} <= kinds.keys()
    aesthetic = np.array([r["aesthetic"] for r in ext])
    assert aesthetic.min() >= 0 and aesthetic.max() <= 10 and aesthetic.std() > 1.0


def test_mojibake_and_whitespace_alts_clean_to_the_caption(sample_web: SampleWeb) -> None:
    fixed = 0
    for r in sample_web.truth():
        if r["extract"] and r["alt_raw"] != r["caption"]:
            assert " ".join(ftfy.fix_text(r["alt_raw"]).split()) == r["caption"]
            fixed += 1
    assert fixed > 0


def test_served_files_match_truth_hashes_and_sizes(sample_web: SampleWeb) -> None:
    for r in sample_web.truth():
        if r["file"] is None:
            continue
        data = (sample_web.root / r["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == r["sha256"] and len(data) == r["bytes"]
        if r["http_behavior"] == "ok":
            with Image.open(io.BytesIO(data)) as img:
                assert img.size == (r["width"], r["height"])
                assert img.format == r["format"]
                assert str(imagehash.phash(img)) == r["phash"]
            assert len(data) >= 5000  # LAION's body-size floor: ok images must pass it


def test_duplicates_are_near_and_distinct_images_are_far(sample_web: SampleWeb) -> None:
    ext = [r for r in sample_web.truth() if r["phash"] is not None]

    def dist(a: str, b: str) -> int:
        return int(imagehash.hex_to_hash(a) - imagehash.hex_to_hash(b))

    groups: dict[int, list[dict[str, object]]] = {}
    for r in ext:
        if r["dup_group"] is not None:
            groups.setdefault(int(r["dup_group"]), []).append(r)  # type: ignore[call-overload]
    for members in groups.values():
        original = next(m for m in members if m["dup_kind"] == "original")
        for m in members:
            if m["dup_kind"] == "exact":
                assert m["sha256"] == original["sha256"] and m["exact_copy_of"] == original["url"]
            assert dist(str(m["phash"]), str(original["phash"])) <= 8, m["dup_kind"]
    singles = [r for r in ext if r["dup_kind"] in (None, "original")]
    uniq = {str(r["phash"]) for r in singles}
    hashes = sorted(uniq)
    close = sum(
        dist(a, b) < sample_web.config.min_phash_distance for i, a in enumerate(hashes) for b in hashes[i + 1 :]
    )
    assert len(uniq) == len({r["sha256"] for r in singles}) and close == 0


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="segments"):
        SampleWebConfig(segments=101)
    with pytest.raises(ValueError, match="mismatch_rate"):
        SampleWebConfig(mismatch_rate=1.5)
    with pytest.raises(ValueError, match="CC-MAIN"):
        SampleWebConfig(crawl="2024-51")


def test_hosts_are_loopback_only(sample_web: SampleWeb) -> None:
    hosts = {urlsplit(r["url"]).hostname for r in sample_web.truth() if r["extract"]}
    assert hosts <= {"127.0.0.1", "127.0.0.2"}


def test_training_corpus_is_deterministic_matched_and_disjoint_from_the_web(sample_web: SampleWeb) -> None:
    """A corpus is a pure function of its seed, has the web's concept and language mix with captions that
    name each image's concept, and shares no image with a sample web of the same integer seed."""
    corpus = training_corpus(96, seed=sample_web.config.seed, shortest_side=40, cfg=sample_web.config, workers=2)
    again = training_corpus(96, seed=sample_web.config.seed, shortest_side=40, cfg=sample_web.config, workers=1)
    assert [(e.caption, e.image.tobytes()) for e in corpus] == [(e.caption, e.image.tobytes()) for e in again]
    other = training_corpus(8, seed=sample_web.config.seed + 1, shortest_side=40, cfg=sample_web.config)
    assert [e.caption for e in other] != [e.caption for e in corpus[:8]]
    assert all(e.image.dtype == np.uint8 and e.image.ndim == 3 and min(e.image.shape[:2]) == 40 for e in corpus)
    for e in corpus:
        if e.concept == "hazard":
            continue
        colour, shape = e.concept.split()
        if e.language == "en":  # English captions spell the concept (translations are checked by the filter)
            assert colour in e.caption and shape[:4] in e.caption, (e.concept, e.caption)
    assert {e.language for e in corpus} >= {"en"} and len({e.concept for e in corpus}) > 20
    assert 0 < sum(e.watermark for e in corpus) < len(corpus)
    # No corpus image is one of the web's images (compared at the same size).
    web_thumbs = set()
    for row in sample_web.truth():
        if row["file"] is not None and row["http_behavior"] == "ok" and row["dup_kind"] in (None, "original"):
            with Image.open(sample_web.root / row["file"]) as im:
                web_thumbs.add(np.asarray(shrink(im, 40)).tobytes())
    assert not web_thumbs & {e.image.tobytes() for e in corpus}
    with pytest.raises(ValueError, match="shortest_side"):
        training_corpus(1, seed=0, shortest_side=0)
