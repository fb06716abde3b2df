"""The `clip` asset on the slurm deployment: a fixture-web partition's CLIP pass run as a SLURM job (on the GPU
partition, holding the fake GPU, scoring on CPU) writes exactly what local mode writes for the same partition."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
from dagster_slurm import ComputeResource

from assets.clip import clip
from assets.downloads import build_downloads, downloads
from assets.pairs import build_pairs, pairs
from curation.sample.server import SampleWebServer
from resources.clip_model import ClipModelResource
from resources.compute import build_compute
from resources.downloader import DownloaderResource
from resources.settings import Settings
from resources.storage import LakeResource
from tests.conftest import SampleWeb
from tests.test_slurm.conftest import sacct

pytestmark = pytest.mark.slurm
SEGMENT = "000"
EMBEDDINGS = ("uids.npy", "img_emb.npy", "text_emb.npy")


def _resources(lake: Path, sample_web: SampleWeb, spec_path: Path, compute: ComputeResource,
               gpus: int = 0) -> dict[str, Any]:
    return {
        "lake": LakeResource(root=str(lake), crawl_root=str(sample_web.root)),
        "downloader": DownloaderResource(allow_loopback=True, processes=1, threads=16),
        "compute": compute,
        "clip_model": ClipModelResource(spec_path=str(spec_path), device="cpu", num_workers=2, batch_size=64,
                                        gpus=gpus),
    }


def test_clip_on_slurm_matches_local_mode(sample_web: SampleWeb, sample_server: SampleWebServer,
                                          sample_models: dict[str, Any], slurm_compute: ComputeResource,
                                          tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    spec_path = tmp_path / "models-spec.json"
    spec_path.write_text(json.dumps(sample_models))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("cc_crawl", [sample_web.config.crawl])
    key = f"{sample_web.config.crawl}|{SEGMENT}"
    local = build_compute(Settings(lake_root=str(lake), crawl_root=str(sample_web.root)))
    result = dg.materialize([pairs, downloads, clip], partition_key=key, instance=instance,
                            resources=_resources(lake, sample_web, spec_path, local))
    assert result.success
    part = lake / "clip" / f"crawl={sample_web.config.crawl}" / f"segment={SEGMENT}"
    reference = tmp_path / "local-clip"
    shutil.copytree(part, reference)

    result = dg.materialize([clip], partition_key=key, instance=instance,
                            resources=_resources(lake, sample_web, spec_path, slurm_compute, gpus=1))
    assert result.success
    assert all(c.passed for c in result.get_asset_check_evaluations())
    [mat] = result.asset_materializations_for_node("clip")
    job_id = str(mat.metadata["slurm_job_id"].value)
    state, partition, tres = sacct(job_id, "State,Partition,AllocTRES")
    assert (state, partition) == ("COMPLETED", "gpu") and "gres/gpu=1" in tres, tres

    # Same rows, same scores, same embeddings: both passes run the same code on CPU with the same threads.
    ours, theirs = pq.read_table(part / "clip.parquet"), pq.read_table(reference / "clip.parquet")
    assert ours.num_rows > 100 and ours.column_names == theirs.column_names
    for name in ours.column_names:
        assert ours.column(name).equals(theirs.column(name)), name
    for name in EMBEDDINGS:
        a, b = np.load(part / "embeddings" / name), np.load(reference / "embeddings" / name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name


def test_cpu_stages_on_slurm_match_the_process(sample_web: SampleWeb, sample_server: SampleWebServer,
                                               slurm_compute: ComputeResource, tmp_path: Path) -> None:
    """`pairs` and `downloads` built for the compute resource (CURATION_CPU_STAGES=compute) run as SLURM jobs and
    write what the in-process assets write."""
    key = f"{sample_web.config.crawl}|{SEGMENT}"
    tables = {}
    for where, assets, compute in (
        ("process", [pairs, downloads], build_compute(Settings(lake_root=str(tmp_path),
                                                               crawl_root=str(sample_web.root)))),
        ("slurm", [build_pairs(on_compute=True), build_downloads(on_compute=True)], slurm_compute),
    ):
        lake = tmp_path / where
        instance = dg.DagsterInstance.ephemeral()
        instance.add_dynamic_partitions("cc_crawl", [sample_web.config.crawl])
        result = dg.materialize(assets, partition_key=key, instance=instance, resources={
            "lake": LakeResource(root=str(lake), crawl_root=str(sample_web.root)),
            "downloader": DownloaderResource(allow_loopback=True, processes=1, threads=16), "compute": compute})
        assert result.success and all(c.passed for c in result.get_asset_check_evaluations())
        if where == "slurm":
            for node in ("pairs", "downloads"):
                [mat] = result.asset_materializations_for_node(node)
                assert sacct(str(mat.metadata["slurm_job_id"].value))[0] == "COMPLETED"
                assert mat.metadata["dagster/row_count"].value > 100
        part = f"crawl={sample_web.config.crawl}/segment={SEGMENT}"
        tables[where] = (pq.read_table(lake / "pairs" / part / "pairs.parquet"),
                         pq.read_table(lake / "downloads" / part / "downloads.parquet",
                                       columns=["uid", "status", "reason", "sha256", "original_width"]).sort_by("uid"))
    assert tables["slurm"][0].equals(tables["process"][0])
    assert tables["slurm"][1].equals(tables["process"][1])
