"""The downloader resource: the HTTP policy (SSRF allow-list, politeness) and image options."""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import Field

from curation.download import DownloadConfig
from curation.netguard import NetPolicy
from curation.stages import download_options


class DownloaderResource(dg.ConfigurableResource):
    """How images are fetched. Private, loopback, link-local and metadata addresses are refused unless
    `allow_loopback` or `allow_cidrs` say otherwise (the sample web needs 127.0.0.0/8)."""

    allow_loopback: bool = False
    allow_cidrs: list[str] = Field(default_factory=list)
    allow_hosts: list[str] = Field(default_factory=list)
    image_size: int = 256
    resize_mode: str = "keep_ratio"
    processes: int = 2
    threads: int = 32
    timeout_s: float = 10.0
    deadline_s: float | None = None  # per URL, connect to last body byte; None: 3 x timeout_s
    retries: int = 1
    max_connections_per_host: int = 4
    number_sample_per_shard: int = 10_000

    def options(self) -> dict[str, Any]:
        """Plain options (`curation.stages.download_options` turns them into config and policy), as a payload
        running on another machine receives them."""
        return self.model_dump()

    def policy(self) -> NetPolicy:
        return download_options(self.options())[1]

    def config(self) -> DownloadConfig:
        return download_options(self.options())[0]
