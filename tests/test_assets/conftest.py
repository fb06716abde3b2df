"""Fixtures shared by the asset tests: the fixture web's partitions materialized through the clip asset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from assets.clip import clip
from assets.dedupe import dedupe
from assets.downloads import downloads
from assets.pairs import pairs
from curation.sample.server import SampleWebServer
from resources.clip_model import ClipModelResource
from resources.compute import build_compute
from resources.downloader import DownloaderResource
from resources.settings import Settings
from resources.storage import LakeResource
from tests.conftest import SampleWeb

SEGMENTS = ("000", "001")


def asset_resources(lake: Path, sample_web: SampleWeb, spec_path: Path) -> dict[str, Any]:
    return {
        "lake": LakeResource(root=str(lake), crawl_root=str(sample_web.root)),
        "downloader": DownloaderResource(allow_loopback=True, processes=1, threads=16),
        "compute": build_compute(Settings(lake_root=str(lake), crawl_root=str(sample_web.root))),
        "clip_model": ClipModelResource(spec_path=str(spec_path), device="cpu", num_workers=2, batch_size=64),
    }


@pytest.fixture(scope="session")
def scored_lake(sample_web: SampleWeb, sample_server: SampleWebServer, sample_models: dict[str, Any],
                tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dg.ExecuteInProcessResult]]:
    """pairs -> downloads -> clip for every segment of the fixture web, scored with the demo's models (trained
    on the default web, so every image here is unseen)."""
    lake = tmp_path_factory.mktemp("scored") / "lake"
    spec_path = lake.parent / "models-spec.json"
    spec_path.write_text(json.dumps(sample_models))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("cc_crawl", [sample_web.config.crawl])
    resources = asset_resources(lake, sample_web, spec_path)
    results = [dg.materialize([pairs, downloads, clip], partition_key=f"{sample_web.config.crawl}|{seg}",
                              resources=resources, instance=instance, raise_on_error=False) for seg in SEGMENTS]
    return lake, results


@pytest.fixture(scope="session")
def deduped(scored_lake: tuple[Path, list[dg.ExecuteInProcessResult]], sample_web: SampleWeb,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dg.ExecuteInProcessResult]:
    """A copy of the scored lake with the dedupe asset materialized over both partitions."""
    lake = tmp_path_factory.mktemp("deduped") / "lake"
    shutil.copytree(scored_lake[0], lake)
    result = dg.materialize([dedupe], resources={"lake": LakeResource(root=str(lake), crawl_root=str(sample_web.root))},
                            raise_on_error=False)
    return lake, result
