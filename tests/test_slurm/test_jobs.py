"""The slurm deployment's job lifecycle on the local cluster, through a minimal probe asset: success, a
failing payload, a walltime overrun, a cancelled run and a retried step that reattaches to its job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
from dagster._utils.error import SerializableErrorInfo
from dagster_slurm import ComputeResource

from tests.test_slurm.conftest import ROOT, jobs_named, live_state, sacct
from tests.test_slurm.probe import probe, probe_job, probe_run_config

pytestmark = pytest.mark.slurm
JOB_TAG = "dagster_slurm/job_id"


def _materialize(compute: ComputeResource, instance: dg.DagsterInstance | None = None,
                 **config: object) -> dg.ExecuteInProcessResult:
    return dg.materialize([probe], resources={"compute": compute}, run_config=probe_run_config(**config),
                          instance=instance, raise_on_error=False)


def _failure_message(result: dg.ExecuteInProcessResult) -> str:
    [failure] = [e for e in result.all_events if e.is_step_failure]
    assert failure.step_failure_data is not None and failure.step_failure_data.error is not None
    error: SerializableErrorInfo | None = failure.step_failure_data.error
    messages = []
    while error is not None:
        messages.append(error.message)
        error = error.cause
    return "\n".join(messages)


def _submitted_job(instance: dg.DagsterInstance, timeout: float = 120) -> tuple[dg.DagsterRun, str]:
    """The first run (and its SLURM job id) that dagster-slurm tagged with a submitted job."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in instance.get_runs():
            if run.tags.get(JOB_TAG):
                return run, run.tags[JOB_TAG]
        time.sleep(0.5)
    raise AssertionError(f"no run was tagged {JOB_TAG} within {timeout} s")


def test_payload_runs_as_a_slurm_job(slurm_compute: ComputeResource) -> None:
    result = _materialize(slurm_compute, seconds=0)
    assert result.success
    [mat] = result.asset_materializations_for_node("probe")
    job_id = str(mat.metadata["slurm_job_id"].value)
    assert mat.metadata["job_from_inside"].value == job_id  # the payload really ran inside that job
    assert sacct(job_id, "State,Partition,Account") == ["COMPLETED", "cpu", "curation"]


def test_failing_payload_fails_the_step_with_the_jobs_stderr(slurm_compute: ComputeResource,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    marker = "probe-failure-7d1c: the payload raised on purpose"
    instance = dg.DagsterInstance.ephemeral()
    result = _materialize(slurm_compute, instance=instance, fail_with=marker)
    assert not result.success
    message = _failure_message(result)
    assert "Final state: FAILED" in message, message
    job_id = message.split("Job ", 1)[1].split()[0]
    assert sacct(job_id) == ["FAILED"]
    # The payload's exception comes back through Pipes as a structured error event in the run's log...
    pipes_errors = [e for e in instance.all_logs(result.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
                    if "closed with exception" in e.message and marker in str(e.dagster_event)]
    assert pipes_errors, "the payload's exception did not reach the event log"
    # ...and the job's stderr is streamed into the step's compute logs: what the payload printed (forwarded
    # by Pipes while its session was open) and the traceback it died with (straight from slurm-<job>.err).
    out, err = capfd.readouterr()
    assert f"probe stderr: {marker}" in out + err
    assert f"[SLURM ERR] RuntimeError: {marker}" in err


def test_walltime_overrun_fails_with_timeout(slurm_compute: ComputeResource) -> None:
    started = time.monotonic()
    result = _materialize(slurm_compute, seconds=600, time_limit="00:01:00", poll_timeout=300)
    assert not result.success
    message = _failure_message(result)
    assert "Final state: TIMEOUT" in message, message
    assert sacct(message.split("Job ", 1)[1].split()[0]) == ["TIMEOUT"]
    assert time.monotonic() - started < 200  # the 1-minute limit plus Slurm's detection, not the sleep


def test_cancelling_the_run_cancels_the_job(slurm_compute: ComputeResource) -> None:
    instance = dg.DagsterInstance.ephemeral()
    found: dict[str, str] = {}

    def terminate_once_submitted() -> None:
        run, job_id = _submitted_job(instance)
        found["job_id"] = job_id
        time.sleep(3)  # let the job start running
        instance.report_run_canceling(run)  # what "Terminate" in the UI does first

    canceller = threading.Thread(target=terminate_once_submitted, daemon=True)
    canceller.start()
    started = time.monotonic()
    result = _materialize(slurm_compute, instance=instance, seconds=600)
    canceller.join(timeout=10)
    assert not result.success
    assert "cancelled" in _failure_message(result)
    assert sacct(found["job_id"]) == ["CANCELLED by 0"]
    assert time.monotonic() - started < 120


def test_retried_step_reattaches_to_its_running_job(slurm_cluster: object, tmp_path: Path) -> None:
    """The process running the step dies while its job runs (a Dagster restart); the re-executed run finds
    the job through the parent run's tags and follows it to the end instead of submitting another."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    since = time.time()
    log = tmp_path / "supervisor.log"
    with log.open("w") as out:
        supervisor = subprocess.Popen([sys.executable, "-m", "tests.test_slurm.probe", str(home), "30"], cwd=ROOT,
                                      stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        instance = dg.DagsterInstance.local_temp(tempdir=str(home))
        try:
            run, job_id = _submitted_job(instance)
        except AssertionError as e:
            raise AssertionError(f"{e}; the supervisor's output ends:\n{log.read_text()[-3000:]}") from None
        time.sleep(2)
        # SIGKILL to the supervisor's whole group (its ssh log tails too): no handler, no scancel, so the job
        # outlives its supervisor, and nothing of the supervisor outlives the test.
        os.killpg(supervisor.pid, signal.SIGKILL)
        supervisor.wait(timeout=30)
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)
    assert live_state(job_id) in ("PENDING", "RUNNING")  # orphaned, not cancelled
    instance.report_run_failed(run)  # what run monitoring records for a run whose process died

    retry = dg.execute_job(dg.reconstructable(probe_job), instance, run_config=probe_run_config(seconds=30.0),
                           reexecution_options=dg.ReexecutionOptions.from_failure(run.run_id, instance))
    assert retry.success
    assert retry.dagster_run.parent_run_id == run.run_id
    [mat] = [e.step_materialization_data.materialization for e in retry.get_asset_materialization_events()]
    assert str(mat.metadata["slurm_job_id"].value) == job_id
    assert mat.metadata["job_from_inside"].value == job_id
    logs = [e.message for e in instance.all_logs(retry.run_id)]
    assert any(f"Reattaching to running Slurm job {job_id}" in m for m in logs), logs
    name = sacct(job_id, "JobName")[0]
    assert jobs_named(name, since) == [(job_id, "COMPLETED")]  # one job for both attempts
