"""Fixtures of the fault tests: the stage fork server, an upstream lake built once, and the figures they report.

The upstream lake holds every stage for the fixture web's two segments (tiny random-init CLIP, thresholds at 0),
built through the same fork server the faults run in. Snapshots of it are the starting points of the fault cases:
each case copies one (shutil.copytree) for the reference run and one per kill.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from curation.sample.server import SampleWebServer
from tests.conftest import SampleWeb
from tests.test_curation.conftest import TINY, TINY_CONFIG
from tests.test_faults.harness import StageServer

SEGMENTS = ("000", "001")
# Lean downloads: one pool process (img2dataset starts it per run), several shards so the swap moves a folder of them.
DOWNLOAD_OPTIONS = {"allow_loopback": True, "processes": 1, "threads": 16, "number_sample_per_shard": 100}
SPEC = {"model_name": TINY, "pretrained": None, "threshold_en": 0.0, "threshold_other": 0.0,
        "nsfw_prompt_sets": {"neutral": ["a photo", "a drawing"], "hazard": ["a hazard sign", "danger stripes"]},
        "unsafe_sets": ["hazard"]}
CLIP_OVERRIDES = {"device": "cpu", "precision": "fp32", "batch_size": 64, "num_workers": 0}
# A subset of most kept pairs, in two parts and re-sharded, so a release writes several files; release 1 of the
# upstream lake uses a higher threshold, so the export under test makes release 2 with a diff.
SUBSET = {"name": "fault_probe", "description": "kept pairs above a similarity", "webdataset": True, "parts": 2,
          "shard_size": 40, "conditions": {"similar": "similarity > $min_sim"}, "params": {"min_sim": 0.0}}
RELEASE_1_OVERRIDES = {"min_sim": 0.05}


@dataclass
class Figures:
    """Per stage: faults injected (deterministic, timed), rows lost and duplicates after reruns, what readers saw."""

    rows: dict[str, dict[str, Any]] = field(default_factory=dict)


FIGURES = Figures()


@dataclass(frozen=True)
class Upstream:
    """Snapshots of the upstream lake and what a job needs to run against it."""

    lake: Path  # every stage done; index generation 1 covers segment 000 only; subset release 1 exists
    before_dedupe: Path  # pairs, downloads, clip of both segments; dedupe state over segment 000 only
    crawl: str
    crawl_root: str
    model_config: str

    def job(self, stage: str, lake: Path, **extra: Any) -> dict[str, Any]:
        job: dict[str, Any] = {"stage": stage, "lake": str(lake), **extra}
        if stage == "pairs":
            job["crawl_root"] = self.crawl_root
        if stage == "downloads":
            job["options"] = DOWNLOAD_OPTIONS
        if stage == "clip":
            job.update(model_config=self.model_config, spec=SPEC, clip_overrides=CLIP_OVERRIDES)
        if stage == "dedupe":
            job.setdefault("partitions", [[self.crawl, s] for s in SEGMENTS])
        if stage == "subset":
            job.setdefault("definition", SUBSET)
        return job


@pytest.fixture(scope="session")
def stage_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StageServer]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    server = StageServer(tmp_path_factory.mktemp("stage-runs"), env)
    yield server
    server.close()


@pytest.fixture(scope="session")
def upstream(stage_server: StageServer, sample_web: SampleWeb, sample_server: SampleWebServer,
             tmp_path_factory: pytest.TempPathFactory) -> Upstream:
    base = tmp_path_factory.mktemp("fault-upstream")
    model_config = base / f"{TINY}.json"
    model_config.write_text(json.dumps(TINY_CONFIG))
    lake = base / "lake"
    up = Upstream(lake=lake, before_dedupe=base / "before-dedupe", crawl=sample_web.config.crawl,
                  crawl_root=str(sample_web.root), model_config=str(model_config))
    for segment in SEGMENTS:
        for stage in ("pairs", "downloads", "clip"):
            stage_server.run_clean(up.job(stage, lake, partition=[up.crawl, segment]))
    stage_server.run_clean(up.job("dedupe", lake, partitions=[[up.crawl, "000"]]))
    shutil.copytree(lake, up.before_dedupe)
    stage_server.run_clean(up.job("index", lake))  # generation 1: segment 000's survivors
    stage_server.run_clean(up.job("dedupe", lake))
    stage_server.run_clean(up.job("subset", lake, overrides=RELEASE_1_OVERRIDES))
    return up


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES.rows:
        return
    tr = terminalreporter
    tr.section("fault injection figures")
    tr.write_line(f"{'case':<14} {'deterministic':>13} {'timed':>5} {'killed':>6} {'group':>5} {'rows lost':>9} "
                  f"{'duplicates':>10}  readers between kill and rerun")
    for case, row in FIGURES.rows.items():
        tr.write_line(f"{case:<14} {row['deterministic']:>13} {row['timed']:>5} {row['killed']:>6} "
                      f"{row['largest_group']:>5} {row['rows_lost']:>9} {row['duplicates']:>10}  {row['readers']}")
    tr.write_line("(group: most live processes in the stage's process group when a timed SIGKILL was sent)")
    for case, row in FIGURES.rows.items():
        tr.write_line(f"{case} kill points: " + "; ".join(row["points"]))
