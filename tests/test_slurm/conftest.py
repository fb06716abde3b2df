"""Fixtures for the SLURM tests: the local cluster (`scripts/slurm.sh up`), the job environment
(`scripts/slurm-env.sh`) and the slurm-mode compute resource, with the cluster's settings exported.

In CI (`CI` set) a cluster that cannot start fails the tests; elsewhere, without root or apt-get (or when
scripts/test.sh could not bring it up: CURATION_SLURM_UNAVAILABLE), they are skipped with the reason.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster_slurm import ComputeResource

from resources.compute import build_compute
from resources.settings import Settings, SlurmSettings

ROOT = Path(__file__).resolve().parents[2]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the SLURM tests are required)", pytrace=False)
    pytest.skip(reason)


def _run(*cmd: str) -> str:
    proc = subprocess.run([str(ROOT / cmd[0]), *cmd[1:]], capture_output=True, text=True, timeout=900)
    if proc.returncode:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}", pytrace=False)
    return proc.stdout


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmSettings]:
    """The local cluster, up, with its job environment built and CURATION_SLURM_* / SLURM_CONF exported."""
    if os.environ.get("CURATION_SLURM_UNAVAILABLE"):
        _unavailable(f"SLURM cluster unavailable: {os.environ['CURATION_SLURM_UNAVAILABLE']}")
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        _unavailable("the local SLURM cluster (scripts/slurm.sh up) needs root and apt-get")
    _run("scripts/slurm.sh", "up")
    env = {}
    for line in _run("scripts/slurm.sh", "env").splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = shlex.split(value)[0] if value else ""
    _run("scripts/slurm-env.sh", env["CURATION_SLURM_ENV"])
    # A short ControlPersist: the test session's SSH master goes away soon after the last job.
    env.setdefault("DAGSTER_SLURM_SSH_CONTROL_PERSIST", "30s")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        yield SlurmSettings.from_env()


@pytest.fixture(scope="session")
def slurm_compute(slurm_cluster: SlurmSettings) -> ComputeResource:
    return build_compute(Settings(lake_root="/nonexistent", crawl_root="/nonexistent", compute="slurm",
                                  slurm=slurm_cluster))


def sacct(job_id: int | str, fields: str = "State") -> list[str]:
    """The job's allocation row from accounting (`fields`: comma-separated sacct fields), once recorded."""
    deadline = time.monotonic() + 30
    while True:
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", str(job_id), "-o", fields],
                             capture_output=True, text=True, check=True).stdout.strip()
        if out or time.monotonic() > deadline:
            return out.split("|") if out else []
        time.sleep(0.5)


def live_state(job_id: int | str) -> str:
    """The job's state as slurmctld sees it now (accounting can lag a few seconds behind)."""
    return subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                          check=False).stdout.strip()


def jobs_named(name: str, since: float) -> list[tuple[str, str]]:
    """(job id, state) of every job called `name` submitted since the epoch time `since`."""
    start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since - 1))
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-S", start, "--name", name, "-o", "JobID,State,Submit"],
                         capture_output=True, text=True, check=True).stdout
    rows = [line.split("|") for line in out.splitlines() if line]
    return [(job, state) for job, state, submit in rows if submit >= start]  # -S also lists jobs still running
