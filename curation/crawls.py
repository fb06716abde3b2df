"""Common Crawl listings: which crawls, segments and WAT files exist under a crawl root.

A crawl root is a local mirror, `https://data.commoncrawl.org` or `s3://commoncrawl`; listings are the
gzip text files Common Crawl publishes (`crawl-data/<ID>/{segment,wat}.paths.gz`).
"""

from __future__ import annotations

import gzip
import re

from curation.io import filesystem
from curation.layout import crawl_listing, join, segment_of

CRAWL_ID = re.compile(r"^CC-MAIN-\d{4}-\d{2}$")


class ListingError(Exception):
    """A crawl listing is missing or unreadable."""


def read_listing(crawl_root: str, crawl: str, kind: str = "wat") -> list[str]:
    """The relative paths in `<crawl_root>/crawl-data/<crawl>/<kind>.paths.gz`, in listing order."""
    path = crawl_listing(crawl_root, crawl, kind)
    fs, p = filesystem(path)
    try:
        with fs.open(p, "rb") as f:
            text = gzip.decompress(f.read()).decode("utf-8")
    except FileNotFoundError:
        raise ListingError(
            f"no {kind} listing for crawl {crawl}: {path} does not exist. Is the crawl id "
            f"right, and does the crawl root point at the folder holding crawl-data/?"
        ) from None
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ListingError(f"cannot read {path}: {exc}") from exc
    return [line.strip() for line in text.splitlines() if line.strip()]


def discover_crawls(crawl_root: str) -> list[str]:
    """Crawl ids that have a WAT listing under a listable crawl root (a local mirror or bucket)."""
    fs, p = filesystem(join(crawl_root, "crawl-data"))
    try:
        entries = fs.ls(p, detail=False)
    except (FileNotFoundError, NotImplementedError):
        return []
    crawls = []
    for entry in entries:
        name = str(entry).rstrip("/").rsplit("/", 1)[-1]
        if CRAWL_ID.match(name) and fs.exists(f"{p}/{name}/wat.paths.gz"):
            crawls.append(name)
    return sorted(crawls)


def wat_files_by_segment(crawl_root: str, crawl: str) -> dict[str, list[str]]:
    """Segment key ("000", …: the index into the sorted segment ids) -> full paths/URLs of its WAT files,
    from one read of the crawl's WAT listing."""
    by_id: dict[str, list[str]] = {}
    for path in read_listing(crawl_root, crawl, "wat"):
        by_id.setdefault(segment_of(path), []).append(join(crawl_root, path))
    return {f"{i:03d}": by_id[seg] for i, seg in enumerate(sorted(by_id))}


def segments(crawl_root: str, crawl: str) -> list[str]:
    """The crawl's segment ids in sorted order; a partition's segment key is an index into this list."""
    return sorted({segment_of(path) for path in read_listing(crawl_root, crawl, "wat")})


def segment_keys(crawl_root: str, crawl: str) -> list[str]:
    """Partition keys ("000", "001", …) of the segments that exist in this crawl."""
    return list(wat_files_by_segment(crawl_root, crawl))


def wat_files(crawl_root: str, crawl: str, segment_key: str) -> list[str]:
    """Full paths/URLs of the WAT files of one segment (by its 3-digit index)."""
    by_key = wat_files_by_segment(crawl_root, crawl)
    if segment_key not in by_key:
        raise ListingError(f"crawl {crawl} has {len(by_key)} segments; segment index {segment_key} does not exist")
    return by_key[segment_key]
