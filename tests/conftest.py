"""Shared fixtures: a small sample web generated once per session and served on loopback."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from curation.cli import default_model_cache
from curation.sample.models import ensure_sample_models
from curation.sample.server import SampleWebServer, serve_sample_web
from curation.sample.web import SampleWebConfig, generate_sample_web

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

HOSTS = ("127.0.0.1", "127.0.0.2")


def free_port(hosts: tuple[str, ...] = HOSTS) -> int:
    """A port that is free on every loopback host the sample web uses."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = int(s.getsockname()[1])
        ok = True
        for host in hosts[1:]:
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    ok = False
        if ok:
            return port
    raise RuntimeError("no free port on the loopback hosts")


@dataclass(frozen=True)
class SampleWeb:
    root: Path
    config: SampleWebConfig
    manifest: dict[str, object]

    def truth(self) -> list[dict[str, object]]:
        return pq.read_table(self.root / "truth.parquet").to_pylist()


SMALL = dict(seed=7, pages=60, segments=2, wat_files_per_segment=2)


@pytest.fixture(scope="session")
def sample_web(tmp_path_factory: pytest.TempPathFactory) -> SampleWeb:
    root = tmp_path_factory.mktemp("sample-web")
    cfg = SampleWebConfig(port=free_port(), **SMALL)  # type: ignore[arg-type]
    manifest = generate_sample_web(root, cfg)
    return SampleWeb(root, cfg, manifest)


@pytest.fixture(scope="session")
def sample_server(sample_web: SampleWeb) -> Iterator[SampleWebServer]:
    with serve_sample_web(sample_web.root) as web:
        yield web


@pytest.fixture(scope="session")
def default_web(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default sample web (what `make demo` generates), on a free port."""
    root = tmp_path_factory.mktemp("sample-web-default")
    generate_sample_web(root, SampleWebConfig(port=free_port()))
    return root


@pytest.fixture(scope="session")
def sample_models(default_web: Path) -> dict[str, Any]:
    """The toy CLIP and heads trained on the default sample web: the demo's models spec. Trained once per
    machine into the shared cache (keyed by training config, code version and sample-web content)."""
    return ensure_sample_models(str(default_web), str(default_model_cache()))


@pytest.fixture(scope="session")
def indexed_lake(sample_web: SampleWeb, sample_server: SampleWebServer, sample_models: dict[str, Any],
                 tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture web through every stage with the core's own calls (no Dagster): pairs, downloads, the CLIP pass
    with the demo's models (trained on the default web, so every image here is unseen), dedupe at pHash radius 0
    (exact copies merge; the planted near-duplicates survive into the index, for result-dedupe tests) and the index."""
    from curation.dedupe import DedupeConfig
    from curation.index import IndexConfig
    from curation.layout import Partition
    from curation.stages import (
        materialize_clip,
        materialize_dedupe,
        materialize_downloads,
        materialize_index,
        materialize_pairs,
    )

    lake = str(tmp_path_factory.mktemp("indexed") / "lake")
    for i in range(len(sample_web.manifest["segments"])):  # type: ignore[arg-type]
        part = Partition(sample_web.config.crawl, f"{i:03d}")
        materialize_pairs(lake, str(sample_web.root), part)
        materialize_downloads(lake, part, {"allow_loopback": True, "processes": 1, "threads": 16})
        materialize_clip(lake, part, sample_models, {"device": "cpu", "precision": "fp32", "num_workers": 2,
                                                      "batch_size": 64})
    materialize_dedupe(lake, DedupeConfig(radius=0))
    materialize_index(lake, IndexConfig())
    return Path(lake)
