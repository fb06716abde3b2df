"""scripts/slurm.sh itself: a second clone's cluster, under a world-writable parent such as /tmp, comes up
beside the session's, logs in over SSH as the tests do, runs jobs on its own daemons and goes down without
touching the session's cluster; and `check` fails with the reason when the login is refused."""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from resources.settings import SlurmSettings
from tests.test_slurm.conftest import ROOT

pytestmark = pytest.mark.slurm
SLURM_SH = str(ROOT / "scripts" / "slurm.sh")


def _slurm_sh(state: Path | None, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CURATION_SLURM_", "SLURM_"))}
    if state is not None:
        env["CURATION_SLURM_STATE"] = str(state)
    proc = subprocess.run([SLURM_SH, *args], capture_output=True, text=True, env=env, timeout=600)
    if check and proc.returncode:
        raise AssertionError(f"slurm.sh {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _env(state: Path) -> dict[str, str]:
    out = {}
    for line in _slurm_sh(state, "env").stdout.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        out[name] = shlex.split(value)[0]
    return out


def _ssh(env: dict[str, str], command: str) -> subprocess.CompletedProcess[str]:
    """A command on the cluster's login node, logged in the way dagster-slurm does (key, strict host key)."""
    return subprocess.run(
        ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
         "-o", f"UserKnownHostsFile={env['CURATION_SLURM_KNOWN_HOSTS']}", "-i", env["CURATION_SLURM_KEY"],
         "-p", env["CURATION_SLURM_PORT"], f"{env['CURATION_SLURM_USER']}@{env['CURATION_SLURM_HOST']}", command],
        capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def second_cluster(slurm_cluster: SlurmSettings) -> Iterator[Path]:
    """Another clone's cluster state, in a private folder directly under /tmp (world-writable, sticky)."""
    tmp = Path(tempfile.gettempdir())
    assert tmp.stat().st_mode & 0o002, f"{tmp} should be world-writable for this test to mean anything"
    with tempfile.TemporaryDirectory(prefix="clone2-", dir=tmp) as d:
        state = Path(d) / "slurm"
        try:
            _slurm_sh(state, "up")
            yield state
        finally:
            _slurm_sh(state, "purge", check=False)


def test_a_second_clone_under_tmp_runs_its_own_cluster(slurm_cluster: SlurmSettings, second_cluster: Path) -> None:
    env = _env(second_cluster)
    assert env["CURATION_SLURM_PORT"] != str(slurm_cluster.port)
    ports = dict(item.split("=") for item in (second_cluster / "etc" / "ports").read_text().split())
    mine = dict(item.split("=") for item in (ROOT / ".data" / "slurm" / "etc" / "ports").read_text().split())
    assert not set(ports.values()) & set(mine.values()), (ports, mine)

    # Over SSH, the second cluster's login node sees its own SLURM_CONF and runs a job with sacct accounting.
    out = _ssh(env, "echo $SLURM_CONF; sbatch --parsable -t 1 -o /dev/null --wrap true")
    assert out.returncode == 0, out.stderr
    conf, job = out.stdout.split()
    assert conf == env["SLURM_CONF"]
    wait = _ssh(env, f"for i in $(seq 100); do s=$(sacct -X -n -P -j {job} -o State); "
                     f'case "$s" in COMPLETED|FAILED|CANCELLED*|TIMEOUT) echo $s; exit 0;; esac; sleep 0.2; done')
    assert wait.stdout.strip() == "COMPLETED", wait



def test_down_of_one_clone_leaves_the_other_running(slurm_cluster: SlurmSettings) -> None:
    with tempfile.TemporaryDirectory(prefix="clone3-", dir=tempfile.gettempdir()) as d:
        state = Path(d) / "slurm"
        try:
            _slurm_sh(state, "up")
            _slurm_sh(state, "down")
            status = _slurm_sh(state, "status", check=False)
            assert status.returncode == 1 and "sshd: stopped" in status.stdout
        finally:
            _slurm_sh(state, "purge", check=False)
    # The session's cluster is untouched: its login check and a job still work.
    assert _slurm_sh(None, "check", check=False).returncode == 0
    assert _slurm_sh(None, "status").returncode == 0


def test_check_names_the_reason_when_the_login_is_refused(slurm_cluster: SlurmSettings, second_cluster: Path) -> None:
    env = _env(second_cluster)
    # Take the second cluster's authorized key away: the login must fail with sshd's and the client's words.
    keys = [p for p in Path("/run/curation-slurm").glob("*/authorized_keys")
            if p.read_text().strip() == Path(env["CURATION_SLURM_KEY"] + ".pub").read_text().strip()]
    assert len(keys) == 1
    saved = keys[0].read_text()
    keys[0].write_text("")
    try:
        proc = _slurm_sh(second_cluster, "check", check=False)
    finally:
        keys[0].write_text(saved)
    assert proc.returncode == 1
    assert "Permission denied (publickey)" in proc.stderr
    assert "SSH login to root@127.0.0.1:" in proc.stderr and "sshd's log" in proc.stderr
    assert _slurm_sh(second_cluster, "check", check=False).returncode == 0
