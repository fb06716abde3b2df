"""The storage resource: lake root (local folder or fsspec URL) and the Common Crawl root."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from curation.layout import CC_HTTPS_ROOT, Lake


class LakeResource(dg.ConfigurableResource):
    """Where every stage writes (`root`) and where crawl listings and WAT files are read (`crawl_root`)."""

    root: str
    crawl_root: str = CC_HTTPS_ROOT
    crawls: list[str] = Field(default_factory=list)

    @property
    def lake(self) -> Lake:
        return Lake(self.root)
