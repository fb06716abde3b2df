"""Every stage SIGKILLed mid-write, then rerun: exactly one row per pair, nothing partial visible, honest markers.

For each stage: a clean run on a copy of the upstream lake counts the stage's write boundaries (and is the
reference); then, per kill point, a fresh copy runs the stage in its own process group until the group is SIGKILLed
at that boundary (before or after the call) or at a seeded random time (the first inside the clean run's longest
stretch without a write: for downloads, while img2dataset's pool workers run). Nothing of the group may survive.
Before the rerun, the lake must read as sound through its readers (markers, SQL views, committed dedupe state, index
generation and subset release); after a clean rerun it must equal the reference, file by file, with no row lost or
duplicated and no temp or staging file left behind.

The stage processes are forked by one server process (tests/test_faults/stage_process.py) that has imported the
stages once; each fork calls setsid(), so it is killed with its whole group exactly like a Popen(start_new_session).
"""

from __future__ import annotations

import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from curation import io
from curation.index import Manifest, verify_index
from curation.layout import Lake, Partition
from curation.subsets import latest_release
from tests.test_faults.conftest import FIGURES, SUBSET, Upstream
from tests.test_faults.harness import StageServer, kill_points, quietest_stretch
from tests.test_faults.lake_checks import (
    compare_lakes,
    dedupe_cluster_problems,
    markers_honest,
    reader_view_problems,
)

pytestmark = pytest.mark.faults
TARGET = "001"  # the partition the per-partition stages rematerialize


@dataclass(frozen=True)
class Case:
    name: str
    stage: str
    deterministic: int  # kill points at write boundaries (budget)
    timed: int  # kills after a random share of the clean run's wall time
    before_dedupe: bool = False  # start from the snapshot whose dedupe state holds segment 000 only
    job: dict[str, object] = field(default_factory=dict)


CASES = (
    Case("pairs", "pairs", deterministic=6, timed=2),
    Case("downloads", "downloads", deterministic=4, timed=1),
    Case("clip", "clip", deterministic=6, timed=2),
    # Incremental: segment 001 joins a state holding 000 (000's rows do not change).
    Case("dedupe", "dedupe", deterministic=6, timed=1, before_dedupe=True),
    # A config change rebuilds the state: both partitions rewritten, one cluster spanning them.
    Case("dedupe-rebuild", "dedupe", deterministic=8, timed=1, before_dedupe=True,
         job={"config": {"only_kept": False}}),
    Case("index", "index", deterministic=6, timed=2),
    Case("subset", "subset", deterministic=6, timed=2),
)


def visible_state(case: Case, lake: Path, source: Path, reference: Path, crawl: str) -> str:
    """What a reader finds of the stage's output after a kill: the old output, the new one, or nothing."""
    if case.stage in ("pairs", "downloads", "clip"):
        part = Partition(crawl, TARGET)
        marker = io.read_marker(Lake(str(lake)).partition_dir(case.stage, part))
        if marker is None:
            return "hidden"
        table = Path(Lake(str(lake)).table(case.stage, part))
        return "new" if table.read_bytes() == Path(Lake(str(reference)).table(case.stage, part)).read_bytes() else "old"
    if case.stage == "dedupe":
        state = io.read_json(str(lake / "dedupe" / "_state" / "state.json"))
        ref_state = io.read_json(str(reference / "dedupe" / "_state" / "state.json"))
        return "new" if state["generation"] == ref_state["generation"] else "old"
    if case.stage == "index":
        manifest = Manifest.load(str(lake), "image")
        ref_manifest = Manifest.load(str(reference), "image")
        assert manifest is not None and ref_manifest is not None
        return "new" if manifest.generation == ref_manifest.generation else "old"
    release = latest_release(str(lake), str(SUBSET["name"]))
    ref_release = latest_release(str(reference), str(SUBSET["name"]))
    assert release is not None and ref_release is not None
    return "new" if release["release"] == ref_release["release"] else "old"


def after_rerun_problems(lake: Path, reference: Path) -> tuple[list[str], int, int]:
    """Everything wrong with a rerun's lake: differences from the reference, reader problems, dishonest markers,
    inconsistent clusters or index. Returns (problems, rows lost, duplicates)."""
    cmp = compare_lakes(str(lake), str(reference))
    problems = cmp.problems + reader_view_problems(str(lake)) + markers_honest(str(lake))
    problems += [f"dedupe clusters: {p}" for p in dedupe_cluster_problems(str(lake))]
    if Manifest.load(str(lake), "image") is not None and (reference / "index" / "image").exists():
        ref_problems = verify_index(str(reference))
        problems += [f"index: {p}" for p in verify_index(str(lake)) if p not in ref_problems]
    if cmp.rows_extra:
        problems.append(f"{cmp.rows_extra} rows the reference does not have")
    return problems, cmp.rows_lost, cmp.duplicates


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_stage_survives_sigkill_and_rerun(case: Case, stage_server: StageServer, upstream: Upstream,
                                          tmp_path: Path) -> None:
    source = upstream.before_dedupe if case.before_dedupe else upstream.lake
    extra: dict[str, object] = {"partition": [upstream.crawl, TARGET]} if case.stage in ("pairs", "downloads",
                                                                                          "clip") else {}
    extra.update(case.job)

    def job(lake: Path) -> dict[str, object]:
        return upstream.job(case.stage, lake, **extra)

    reference = tmp_path / "reference"
    shutil.copytree(source, reference)
    clean = stage_server.run(job(reference), trace=True)
    assert clean.exit == 0, clean.log[-4000:]
    assert clean.trace, "the clean run crossed no write boundary: the wrappers are not in the stage's path"
    assert reader_view_problems(str(reference)) == [], "the reference run itself is unsound"
    assert dedupe_cluster_problems(str(reference)) == []

    rng = random.Random(f"faults-{case.name}")
    plan: list[tuple[str, dict[str, Any]]] = []  # (label, how StageServer.run kills it)
    for n, when in kill_points(clean.trace, case.deterministic):
        plan.append((f"#{n}/{len(clean.trace)} {when} {clean.trace[n - 1].op}", {"kill_at": n, "when": when}))
    # Timed kills: the first inside the clean run's longest stretch without a write (for downloads, while
    # img2dataset's pool workers run), the others anywhere in it.
    lo, hi = quietest_stretch(clean.trace, clean.seconds)
    for i in range(case.timed):
        at = (rng.uniform(lo + 0.2 * (hi - lo), hi - 0.2 * (hi - lo)) if i == 0
              else rng.uniform(0.1, 0.9) * clean.seconds)
        plan.append((f"timed {at:.2f} s of {clean.seconds:.2f} s", {"kill_after_s": at}))

    failures: list[str] = []
    seen: Counter[str] = Counter()
    killed = lost = duplicates = cluster_mixed = largest_group = 0
    for label, kill in plan:
        lake = tmp_path / "faulted"
        shutil.copytree(source, lake)
        outcome = stage_server.run(job(lake), **kill)
        if outcome.survivors:
            failures.append(f"{label}: processes of the killed group survived: {outcome.survivors}")
        if label.startswith("#") and not (outcome.killed and outcome.killed_at):
            failures.append(f"{label}: the stage was not killed there (exit {outcome.exit}, signal {outcome.signal}): "
                            f"its write boundaries differ from the clean run's\n{outcome.log[-2000:]}")
        killed += outcome.killed
        largest_group = max(largest_group, outcome.group_at_kill)
        between = reader_view_problems(str(lake))
        failures += [f"{label}: before the rerun, a reader sees: {p}" for p in between]
        seen[visible_state(case, lake, source, reference, upstream.crawl)] += 1
        cluster_mixed += bool(dedupe_cluster_problems(str(lake)))

        rerun = stage_server.run(job(lake))
        if rerun.exit != 0:
            failures.append(f"{label}: the rerun failed (exit {rerun.exit}):\n{rerun.log[-3000:]}")
        else:
            problems, n_lost, n_dup = after_rerun_problems(lake, reference)
            lost += n_lost
            duplicates += n_dup
            failures += [f"{label}: after the rerun: {p}" for p in problems]
        shutil.rmtree(lake)

    readers = ", ".join(f"{k} {v}" for k, v in sorted(seen.items()))
    if cluster_mixed:
        readers += f"; dedupe clusters mixed across generations after {cluster_mixed}"
    FIGURES.rows[case.name] = {"deterministic": len(plan) - case.timed, "timed": case.timed, "killed": killed,
                                "rows_lost": lost, "duplicates": duplicates, "readers": readers,
                                "points": [label for label, _ in plan], "largest_group": largest_group}
    assert not failures, "\n".join(failures)
    assert lost == 0 and duplicates == 0
    assert killed >= len(plan) - case.timed, "every deterministic kill point must have killed the stage"
    if case.stage == "downloads":
        assert largest_group >= 2, "no timed kill hit img2dataset's pool: the group kill of its workers went untested"
