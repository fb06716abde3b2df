"""The Definitions that `workspace.yaml` loads: every asset, check, sensor and resource, from the environment.

A bad setting fails the load with one line naming the variable to fix (see `Settings.check`).
"""

from __future__ import annotations

from assets.wiring import build_definitions
from resources.settings import Settings

__all__ = ["build_definitions", "defs"]

defs = build_definitions(Settings.from_env())
