"""The downloader resource: the HTTP policy (SSRF allow-list, politeness) and image options."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from curation.download import DownloadConfig
from curation.netguard import NetPolicy


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
    retries: int = 1
    max_connections_per_host: int = 4
    number_sample_per_shard: int = 10_000

    def policy(self) -> NetPolicy:
        kwargs = {"allow_cidrs": tuple(self.allow_cidrs), "allow_hosts": tuple(self.allow_hosts)}
        return NetPolicy.with_loopback(**kwargs) if self.allow_loopback else NetPolicy(**kwargs)

    def config(self) -> DownloadConfig:
        return DownloadConfig(
            image_size=self.image_size,
            resize_mode=self.resize_mode,
            processes=self.processes,
            threads=self.threads,
            timeout_s=self.timeout_s,
            retries=self.retries,
            max_connections_per_host=self.max_connections_per_host,
            number_sample_per_shard=self.number_sample_per_shard,
        )
