"""The compute resource: dagster-slurm's `ComputeResource`, local mode by default, `slurm` mode on a cluster.

All `dagster_slurm` imports live in this module. dagster-slurm's local client insists on an active
pixi environment, which this project does not use (pixi is not installable from the registries we
rely on); `LocalComputeResource` builds the same `LocalPipesClient` with that check off. In slurm mode
the job runs in a pre-deployed environment (`scripts/slurm-env.sh`), so nothing is packed with pixi either.
"""

from __future__ import annotations

from typing import Any

from dagster_slurm import (
    BashLauncher,
    ComputeResource,
    LocalPipesClient,
    SlurmQueueConfig,
    SlurmResource,
    SSHConnectionResource,
)
from dagster_slurm.config.environment import ExecutionMode

from resources.settings import Settings, SlurmSettings


class LocalComputeResource(ComputeResource):
    """`ComputeResource` whose local mode runs payloads with this environment's Python, no pixi."""

    def get_pipes_client(self, context: Any, launcher: Any = None) -> Any:
        if self.mode == ExecutionMode.LOCAL:
            return LocalPipesClient(launcher=self._resolve_launcher(launcher), require_pixi=False)
        return super().get_pipes_client(context, launcher)


class SlurmComputeResource(ComputeResource):
    """`ComputeResource` in slurm mode whose steps that ask for GPUs (`gpus_per_node` in `extra_slurm_opts`)
    go to `gpu_partition` unless they name a partition themselves; every other step goes to the queue's."""

    gpu_partition: str = ""

    def run(self, *args: Any, **kwargs: Any) -> Any:
        opts = dict(kwargs.get("extra_slurm_opts") or {})
        if opts.get("gpus_per_node") and self.gpu_partition and not opts.get("partition"):
            opts["partition"] = self.gpu_partition
        kwargs["extra_slurm_opts"] = opts or None
        return super().run(*args, **kwargs)


def build_slurm_compute(slurm: SlurmSettings) -> SlurmComputeResource:
    """One `sbatch` per asset step over SSH (key auth, strict host keys), in the pre-deployed environment.
    Only the key's path is configured: no secret reaches a job script, the run tags or the logs."""
    ssh = SSHConnectionResource(host=slurm.host, port=slurm.port, user=slurm.user, key_path=slurm.key_path,
                                host_key_checking="strict", known_hosts_file=slurm.known_hosts)
    queue = SlurmQueueConfig(partition=slurm.partition, time_limit=slurm.walltime, cpus=slurm.cpus, mem=slurm.mem,
                             account=slurm.account, qos=slurm.qos)
    return SlurmComputeResource(
        mode=ExecutionMode.SLURM,
        slurm=SlurmResource(ssh=ssh, queue=queue, remote_base=slurm.remote_base),
        default_launcher=BashLauncher(),
        pre_deployed_env_path=slurm.env_path,
        gpu_partition=slurm.gpu_partition,
    )


def build_compute(settings: Settings) -> ComputeResource:
    """The compute resource selected by `settings.compute`: a local subprocess, or a SLURM job per step."""
    if settings.compute == "local":
        return LocalComputeResource(mode=ExecutionMode.LOCAL, default_launcher=BashLauncher())
    if settings.compute == "slurm" and settings.slurm is not None:
        return build_slurm_compute(settings.slurm)
    raise ValueError(f"unknown compute mode {settings.compute!r}")
