"""Extraction quality on the sample web, measured against its ground truth."""

from __future__ import annotations

import gzip
from collections import Counter
from pathlib import Path

import pytest

from curation import crawls as cc
from curation import records
from curation.wat import extract_pairs
from tests.conftest import SampleWeb


def _extract_all(root: Path, crawl: str) -> list[dict[str, object]]:
    """Extract every segment in order, each deduplicated against the earlier ones (as the asset does)."""
    seen: set[int] = set()
    rows: list[dict[str, object]] = []
    for seg in cc.segment_keys(str(root), crawl):
        result = extract_pairs(cc.wat_files(str(root), crawl, seg), crawl=crawl, segment=seg, exclude_uids=seen)
        seen |= set(result.table.column(records.UID).to_pylist())
        rows += result.table.to_pylist()
    return rows


def test_every_expected_link_is_extracted_and_nothing_excluded(sample_web: SampleWeb) -> None:
    truth = {str(r["url"]): r for r in sample_web.truth()}
    rows = _extract_all(sample_web.root, sample_web.config.crawl)
    got = [str(r["url"]) for r in rows]
    expected = {u for u, r in truth.items() if r["extract"]}
    assert len(got) == len(set(got)), "a (url, text) pair was emitted twice"
    recall = len(set(got) & expected) / len(expected)
    precision = len(set(got) & expected) / len(got)
    assert recall == 1.0 and precision == 1.0, (recall, precision)
    relative = [u for u in got if truth[u]["link_form"] in ("relative", "root_relative", "base_relative")]
    assert len(relative) > 100  # the links LAION-5B dropped are kept
    for r in rows:
        assert r["text"] == truth[str(r["url"])]["caption"]
        assert r["page_url"] and r["wat_file"] and int(r["wat_record"]) >= 0  # type: ignore[call-overload]


def test_language_id_agrees_with_truth(sample_web: SampleWeb) -> None:
    truth = {str(r["url"]): r for r in sample_web.truth()}
    rows = _extract_all(sample_web.root, sample_web.config.crawl)
    pairs = Counter((truth[str(r["url"])]["language"], r["language"]) for r in rows)
    total = sum(pairs.values())
    assert sum(n for (t, g), n in pairs.items() if t == g) / total >= 0.97
    for lang in ("de", "fr", "es"):
        of_lang = sum(n for (t, _), n in pairs.items() if t == lang)
        assert pairs[(lang, lang)] / of_lang >= 0.85, lang


def test_a_corrupt_member_and_a_truncated_tail_lose_only_those_records(sample_web: SampleWeb, tmp_path: Path) -> None:
    crawl = sample_web.config.crawl
    wat = Path(cc.wat_files(str(sample_web.root), crawl, "000")[0])
    clean = extract_pairs([str(wat)], crawl=crawl, segment="000")
    data = bytearray(wat.read_bytes())
    starts = [i for i in range(len(data) - 2) if data[i : i + 3] == b"\x1f\x8b\x08"]
    victim = starts[len(starts) // 2]
    data[victim + 20 : victim + 60] = b"\x00" * 40  # wreck one member's deflate stream
    cut = data[: starts[-4] + 50]  # and stop mid-member near the end
    bad = tmp_path / wat.name
    bad.write_bytes(bytes(cut))
    result = extract_pairs([str(bad)], crawl=crawl, segment="000")
    assert result.counts[records.BAD_GZIP_MEMBER] >= 1
    assert result.counts[records.TRUNCATED_FILE] == 1
    # Exactly the two damaged pages are lost; every other page's pairs come out unchanged.
    assert clean.counts["pages"] - result.counts["pages"] == 2
    by_record = lambda t: {(r["wat_record"], r["url"], r["text"]) for r in t.to_pylist()}  # noqa: E731
    kept, before = by_record(result.table), by_record(clean.table)
    assert kept <= before
    assert len({rec for rec, _, _ in before - kept}) == 2


def test_an_unreadable_wat_fails_with_a_clear_message(tmp_path: Path) -> None:
    from curation.wat import WatReadError

    junk = tmp_path / "junk.warc.wat.gz"
    junk.write_bytes(gzip.compress(b"") + b"not gzip at all" * 10)
    with pytest.raises(WatReadError, match=r"junk\.warc\.wat\.gz"):
        extract_pairs([str(junk)], crawl="CC-MAIN-2024-51", segment="000")
    with pytest.raises(WatReadError, match=r"missing\.warc\.wat\.gz"):
        extract_pairs([str(tmp_path / "missing.warc.wat.gz")], crawl="CC-MAIN-2024-51", segment="000")
