"""The downloader resource: the HTTP policy (SSRF allow-list, politeness) and image options."""

from __future__ import annotations

from typing import Any

import dagster as dg
from pydantic import Field

from curation.download import DownloadConfig

_D = DownloadConfig()  # the core's defaults, the single source of every option below but `processes`


class DownloaderResource(dg.ConfigurableResource):
    """How images are fetched. Private, loopback, link-local and metadata addresses are refused unless
    `allow_loopback` or `allow_cidrs` say otherwise (the sample web needs 127.0.0.0/8)."""

    allow_loopback: bool = False
    allow_cidrs: list[str] = Field(default_factory=list)
    allow_hosts: list[str] = Field(default_factory=list)
    image_size: int = _D.image_size
    resize_mode: str = _D.resize_mode
    processes: int = 2  # the asset's own choice: both cores of a laptop (the core defaults to one process)
    threads: int = _D.threads
    timeout_s: float = _D.timeout_s
    deadline_s: float | None = _D.deadline_s  # per URL, connect to last body byte; None: 3 x timeout_s
    retries: int = _D.retries
    max_connections_per_host: int | None = _D.max_connections_per_host
    number_sample_per_shard: int = _D.number_sample_per_shard
    user_agent_token: str = _D.user_agent_token  # sent in User-Agent, and our group in robots.txt files
    respect_robots_txt: bool = _D.respect_robots_txt  # each host's robots.txt, once per host and worker
    respect_tdm_reservation: bool = _D.respect_tdm_reservation  # refuse images served with tdm-reservation: 1

    def options(self) -> dict[str, Any]:
        """Plain options (`curation.stages.download_options` turns them into config and policy), as a payload
        running on another machine receives them."""
        return self.model_dump()
