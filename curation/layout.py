"""The lake layout: the single source of truth for every path a stage reads or writes.

Per-partition tables live under hive-style folders (``crawl=…/segment=…``) so DuckDB and polars can
read a whole stage with one glob. Paths are plain strings so the root may be a local folder or any
fsspec URL (``s3://bucket/lake``).
"""

from __future__ import annotations

from dataclasses import dataclass

SUCCESS_MARKER = "_SUCCESS.json"
# Files of a partition's `embeddings_dir`: L2-normalised float16 [n, d] arrays and the aligned int64 uids.
IMG_EMB_FILE = "img_emb.npy"
TEXT_EMB_FILE = "text_emb.npy"
UIDS_FILE = "uids.npy"
EMBEDDING_FILES = {"image": IMG_EMB_FILE, "text": TEXT_EMB_FILE}  # an index's modality -> the npy it reads

# Stage name -> table file inside a partition folder. `curation sql` builds one view per entry.
STAGE_TABLES: dict[str, str] = {
    "pairs": "pairs.parquet",
    "downloads": "downloads.parquet",
    "clip": "clip.parquet",
    "dedupe": "dedupe.parquet",
}


def join(root: str, *parts: str) -> str:
    """Join path parts with '/', for local paths and URLs alike."""
    out = root.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


@dataclass(frozen=True)
class Partition:
    """One (crawl, segment) unit of work; `segment` is the 3-digit index into the crawl's segment list."""

    crawl: str
    segment: str

    def __post_init__(self) -> None:
        if not self.crawl or "/" in self.crawl or "|" in self.crawl:
            raise ValueError(f"bad crawl id {self.crawl!r}")
        if not (len(self.segment) == 3 and self.segment.isdigit()):
            raise ValueError(f"segment must be a 3-digit index like '007', got {self.segment!r}")

    @classmethod
    def from_key(cls, key: str) -> Partition:
        """Parse a Dagster multi-partition key; dimensions sort by name, so it reads `crawl|segment`."""
        crawl, _, segment = key.partition("|")
        return cls(crawl, segment)

    @property
    def key(self) -> str:
        return f"{self.crawl}|{self.segment}"

    @property
    def path(self) -> str:
        return f"crawl={self.crawl}/segment={self.segment}"


@dataclass(frozen=True)
class Lake:
    """Paths inside one lake root."""

    root: str

    def stage_dir(self, stage: str) -> str:
        return join(self.root, stage)

    def partition_dir(self, stage: str, part: Partition) -> str:
        return join(self.root, stage, part.path)

    def table(self, stage: str, part: Partition) -> str:
        return join(self.partition_dir(stage, part), STAGE_TABLES[stage])

    def marker(self, stage: str, part: Partition) -> str:
        return join(self.partition_dir(stage, part), SUCCESS_MARKER)

    def shards_dir(self, part: Partition) -> str:
        return join(self.partition_dir("downloads", part), "shards")

    def embeddings_dir(self, part: Partition) -> str:
        return join(self.partition_dir("clip", part), "embeddings")

    def index_dir(self) -> str:
        return join(self.root, "index")

    def subset_dir(self, name: str) -> str:
        return join(self.root, "subsets", name)

    def saved_subsets_dir(self) -> str:
        """Subset definitions saved into the lake (a saved search); a subset name never starts with '_'."""
        return join(self.root, "subsets", "_registry")

    def saved_subset(self, name: str) -> str:
        return join(self.saved_subsets_dir(), f"{name}.json")


# The Common Crawl side: listings and WAT paths relative to a crawl root (local mirror, https or s3).
CC_HTTPS_ROOT = "https://data.commoncrawl.org"


def crawl_listing(crawl_root: str, crawl: str, kind: str = "wat") -> str:
    """`<root>/crawl-data/<crawl>/<kind>.paths.gz`, e.g. the WAT or segment listing."""
    return join(crawl_root, "crawl-data", crawl, f"{kind}.paths.gz")


def segment_of(wat_path: str) -> str:
    """The segment folder name of a WAT path (`…/segments/<seg>/wat/…`)."""
    parts = wat_path.split("/")
    try:
        return parts[parts.index("segments") + 1]
    except (ValueError, IndexError):
        raise ValueError(f"not a Common Crawl WAT path (no segments/<id>/): {wat_path}") from None
