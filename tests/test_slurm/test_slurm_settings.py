"""The slurm deployment's settings and resource wiring (no cluster needed): CURATION_SLURM_* are read once,
missing or wrong values fail with the names to set, and the resource gets paths, never secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
from dagster_slurm.config.environment import ExecutionMode

from assets.definitions import build_definitions
from resources.compute import SlurmComputeResource, build_compute
from resources.settings import Settings, SlurmSettings

REQUIRED = ("HOST", "USER", "KEY", "KNOWN_HOSTS", "REMOTE_BASE", "ENV")


@pytest.fixture
def slurm_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    (tmp_path / "id").write_text("not a real key")
    (tmp_path / "known_hosts").write_text("[login]:22 ssh-ed25519 AAAA")
    env = {"HOST": "login.example", "PORT": "2200", "USER": "curator", "KEY": str(tmp_path / "id"),
           "KNOWN_HOSTS": str(tmp_path / "known_hosts"), "REMOTE_BASE": "/shared/runs", "ENV": "/shared/env/abc",
           "PARTITION": "cpu", "GPU_PARTITION": "a100", "ACCOUNT": "proj", "QOS": "normal", "WALLTIME": "02:00:00"}
    for name in (*REQUIRED, "PORT", "PARTITION", "GPU_PARTITION", "ACCOUNT", "QOS", "WALLTIME", "JOB_CPUS", "JOB_MEM"):
        monkeypatch.delenv(f"CURATION_SLURM_{name}", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(f"CURATION_SLURM_{name}", value)
    return env


def test_slurm_settings_from_env(slurm_env: dict[str, str]) -> None:
    s = SlurmSettings.from_env()
    assert (s.host, s.port, s.user, s.partition, s.gpu_partition, s.account, s.qos, s.walltime) == (
        "login.example", 2200, "curator", "cpu", "a100", "proj", "normal", "02:00:00")
    assert (s.key_path, s.env_path, s.cpus, s.mem) == (slurm_env["KEY"], "/shared/env/abc", 2, "4G")


def test_every_missing_variable_is_named(slurm_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CURATION_SLURM_HOST")
    monkeypatch.delenv("CURATION_SLURM_ENV")
    with pytest.raises(ValueError, match="CURATION_SLURM_HOST, CURATION_SLURM_ENV") as e:
        Settings(lake_root="/lake", crawl_root="/crawl", compute="slurm")
    assert "scripts/slurm.sh env" in str(e.value)


def test_wrong_values_are_refused(slurm_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CURATION_SLURM_KEY", "/nonexistent/id_ed25519")
    with pytest.raises(ValueError, match="SSH key /nonexistent/id_ed25519 does not exist"):
        SlurmSettings.from_env()
    monkeypatch.setenv("CURATION_SLURM_KEY", slurm_env["KEY"])
    monkeypatch.setenv("CURATION_SLURM_WALLTIME", "two hours")
    with pytest.raises(ValueError, match="not a Slurm time limit"):
        SlurmSettings.from_env()
    monkeypatch.setenv("CURATION_SLURM_WALLTIME", "90")
    monkeypatch.setenv("CURATION_SLURM_ENV", "relative/env")
    with pytest.raises(ValueError, match="env_path must be an absolute path"):
        SlurmSettings.from_env()
    with pytest.raises(ValueError, match="CURATION_COMPUTE must be one of local, slurm"):
        Settings(lake_root="/lake", crawl_root="/crawl", compute="kubernetes")


def test_local_stays_the_default_and_needs_no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CURATION_COMPUTE", raising=False)
    monkeypatch.delenv("CURATION_SLURM_HOST", raising=False)
    settings = Settings.from_env()
    assert settings.compute == "local" and settings.slurm is None
    assert build_compute(settings).mode == ExecutionMode.LOCAL


def test_slurm_compute_is_wired_from_the_settings(slurm_env: dict[str, str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CURATION_COMPUTE", "slurm")
    compute = build_compute(Settings.from_env())
    assert isinstance(compute, SlurmComputeResource) and compute.mode == ExecutionMode.SLURM
    assert compute.pre_deployed_env_path == "/shared/env/abc" and compute.gpu_partition == "a100"
    assert compute.slurm is not None and compute.slurm.remote_base == "/shared/runs"
    ssh, queue = compute.slurm.ssh, compute.slurm.queue
    assert (ssh.host, ssh.port, ssh.user, ssh.key_path, ssh.password) == (
        "login.example", 2200, "curator", slurm_env["KEY"], None)
    assert (ssh.host_key_checking, ssh.known_hosts_file, ssh.batch_mode) == ("strict", slurm_env["KNOWN_HOSTS"], True)
    assert (queue.partition, queue.time_limit, queue.account, queue.qos) == ("cpu", "02:00:00", "proj", "normal")


def test_gpu_stages_request_a_gpu_under_slurm_by_default(slurm_env: dict[str, str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CURATION_COMPUTE", "slurm")
    monkeypatch.delenv("CURATION_CLIP_GPUS", raising=False)
    monkeypatch.delenv("CURATION_INDEX_GPUS", raising=False)
    settings = Settings.from_env()
    assert (settings.clip_gpus, settings.index_gpus) == (1, 1)
    assert build_definitions(settings).resources["clip_model"].gpus == 1
    monkeypatch.setenv("CURATION_CLIP_GPUS", "0")
    assert Settings.from_env().clip_gpus == 0
    monkeypatch.setenv("CURATION_COMPUTE", "local")
    monkeypatch.delenv("CURATION_CLIP_GPUS")
    assert (Settings.from_env().clip_gpus, Settings.from_env().index_gpus) == (0, 0)
