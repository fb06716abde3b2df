"""The compute resource: dagster-slurm's `ComputeResource`, local mode by default.

All `dagster_slurm` imports live in this module. dagster-slurm's local client insists on an active
pixi environment, which this project does not use (pixi is not installable from the registries we
rely on); `LocalComputeResource` builds the same `LocalPipesClient` with that check off.
"""

from __future__ import annotations

from typing import Any

from dagster_slurm import BashLauncher, ComputeResource, LocalPipesClient
from dagster_slurm.config.environment import ExecutionMode

from resources.settings import Settings


class LocalComputeResource(ComputeResource):
    """`ComputeResource` whose local mode runs payloads with this environment's Python, no pixi."""

    def get_pipes_client(self, context: Any, launcher: Any = None) -> Any:
        if self.mode == ExecutionMode.LOCAL:
            return LocalPipesClient(launcher=self._resolve_launcher(launcher), require_pixi=False)
        return super().get_pipes_client(context, launcher)


def build_compute(settings: Settings) -> ComputeResource:
    """The compute resource selected by `settings.compute`."""
    if settings.compute == "local":
        return LocalComputeResource(mode=ExecutionMode.LOCAL, default_launcher=BashLauncher())
    raise ValueError(f"unknown compute mode {settings.compute!r}")
