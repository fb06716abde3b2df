"""A minimal asset that runs `probe_payload.py` through the compute resource, for the SLURM tests.

`python -m tests.test_slurm.probe DAGSTER_HOME SECONDS` runs it as a job on the slurm deployment
(CURATION_SLURM_*) against a persistent instance in DAGSTER_HOME: the reattach test kills that process
mid-job and re-executes the run.
"""


import sys
from pathlib import Path

import dagster as dg
from dagster_slurm import ComputeResource

from resources.compute import build_compute
from resources.settings import Settings

PAYLOAD = str(Path(__file__).with_name("probe_payload.py"))


class ProbeConfig(dg.Config):
    seconds: float = 0.0
    fail_with: str = ""
    time_limit: str = ""
    poll_timeout: int = 600


@dg.asset
def probe(context: dg.AssetExecutionContext, config: ProbeConfig, compute: ComputeResource) -> dg.MaterializeResult:
    """Sleeps `seconds` in a compute job, then succeeds or raises `fail_with`."""
    invocation = compute.run(
        context=context,
        payload_path=PAYLOAD,
        extras={"seconds": config.seconds, "fail_with": config.fail_with},
        extra_slurm_opts={"time_limit": config.time_limit} if config.time_limit else None,
        poll_timeout=config.poll_timeout,
    )
    return invocation.get_materialize_result()


def probe_run_config(**config: object) -> dict[str, object]:
    return {"ops": {"probe": {"config": config}}}


def probe_job() -> dg.JobDefinition:
    """The probe on the slurm deployment from CURATION_SLURM_*, in process (reconstructable for re-execution)."""
    compute = build_compute(Settings(lake_root="/nonexistent", crawl_root="/nonexistent", compute="slurm"))
    job = dg.define_asset_job("probe_job", selection=[probe], executor_def=dg.in_process_executor)
    return dg.Definitions(assets=[probe], jobs=[job], resources={"compute": compute}).resolve_job_def("probe_job")


def main(argv: list[str]) -> int:
    home, seconds = argv
    instance = dg.DagsterInstance.local_temp(tempdir=home)
    config = probe_run_config(seconds=float(seconds))
    result = dg.execute_job(dg.reconstructable(probe_job), instance, run_config=config)
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
