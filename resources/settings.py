"""Project settings read from the environment once, at the edge (never inside `curation/`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from curation.layout import CC_HTTPS_ROOT


@dataclass(frozen=True)
class Settings:
    """Where the lake and the crawl listings live, and how compute is dispatched."""

    lake_root: str
    crawl_root: str
    compute: str = "local"
    crawls: tuple[str, ...] = ()
    allow_loopback: bool = False
    clip_spec: str | None = None
    clip_device: str = "auto"
    subsets_registry: str | None = None
    subset_cron: str = "0 4 * * *"

    def __post_init__(self) -> None:
        if self.compute not in ("local",):
            raise ValueError(f"CURATION_COMPUTE must be 'local', got {self.compute!r}")

    @classmethod
    def from_env(cls) -> Settings:
        """CURATION_LAKE, CURATION_CRAWL_ROOT, CURATION_COMPUTE, CURATION_CRAWLS (comma list),
        CURATION_ALLOW_LOOPBACK (1 to let the downloader reach 127.0.0.0/8, for the sample web),
        CURATION_CLIP_SPEC (models spec JSON for the clip asset), CURATION_CLIP_DEVICE (auto, cpu, cuda),
        CURATION_SUBSETS (a YAML/JSON registry of extra subset definitions), CURATION_SUBSET_CRON (when the
        subset_refresh schedule re-exports the subsets; default daily at 04:00)."""
        lake = os.environ.get("CURATION_LAKE") or str(Path(".data/lake").absolute())
        crawls = tuple(c.strip() for c in os.environ.get("CURATION_CRAWLS", "").split(",") if c.strip())
        return cls(
            lake_root=lake,
            crawl_root=os.environ.get("CURATION_CRAWL_ROOT") or CC_HTTPS_ROOT,
            compute=os.environ.get("CURATION_COMPUTE", "local"),
            crawls=crawls,
            allow_loopback=os.environ.get("CURATION_ALLOW_LOOPBACK", "") in ("1", "true", "yes"),
            clip_spec=os.environ.get("CURATION_CLIP_SPEC") or None,
            clip_device=os.environ.get("CURATION_CLIP_DEVICE", "auto"),
            subsets_registry=os.environ.get("CURATION_SUBSETS") or None,
            subset_cron=os.environ.get("CURATION_SUBSET_CRON") or "0 4 * * *",
        )
