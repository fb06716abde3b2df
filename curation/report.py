"""The one shape of every stage's result for the orchestrator: typed metadata, check outcomes and a log line.

A stage's core call (`curation.stages`) returns a `StageReport` whether it runs in the Dagster process or as a
Pipes payload on the compute resource: `assets/reporting.py` turns it into a `MaterializeResult` in process, and
`send` hands it to Dagster Pipes from a payload, which Dagster turns into the same result. Values are plain
(numbers, strings, markdown, JSON-able objects), so both paths carry them unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

METADATA_TYPES = ("int", "float", "text", "md", "path", "json", "bool")
Metadata = dict[str, tuple[str, Any]]  # key -> (type in METADATA_TYPES, value)


@dataclass(frozen=True)
class CheckOutcome:
    """One asset check's result: passed or not, with its own metadata; `warn_only` checks never block."""

    name: str
    passed: bool
    metadata: Metadata = field(default_factory=dict)
    warn_only: bool = False


@dataclass(frozen=True)
class StageReport:
    """What a stage wrote and measured: materialization metadata, its checks and one line for the log."""

    metadata: Metadata
    checks: list[CheckOutcome] = field(default_factory=list)
    log: str = ""

    def __post_init__(self) -> None:
        bad = sorted(k for k, (kind, _) in self.metadata.items() if kind not in METADATA_TYPES)
        bad += [f"{check.name}.{k}" for check in self.checks for k, (kind, _) in check.metadata.items()
                if kind not in METADATA_TYPES]
        if bad:
            raise ValueError(f"metadata types must be among {METADATA_TYPES}: {bad}")


def problems_check(name: str, problems: list[str], *, limit: int = 20, **extra: tuple[str, Any]) -> CheckOutcome:
    """A check that passes when a verification found no problems; the first `limit` are its metadata."""
    return CheckOutcome(name, not problems, {"problems": ("text", "\n".join(problems[:limit]) or "none"), **extra})


def pipes_metadata(metadata: Mapping[str, tuple[str, Any]]) -> dict[str, dict[str, Any]]:
    """{key: (type, value)} in Dagster Pipes' {"raw_value", "type"} form."""
    return {k: {"raw_value": v, "type": t} for k, (t, v) in metadata.items()}


class PipesContext(Protocol):
    """The part of `dagster_pipes.PipesContext` that `send` uses (the core never imports Dagster)."""

    @property
    def log(self) -> Any: ...

    def report_asset_materialization(self, *, metadata: Any = ...) -> None: ...

    def report_asset_check(self, check_name: str, passed: bool, severity: Any = ..., metadata: Any = ...) -> None: ...


def send(report: StageReport, pipes: PipesContext) -> None:
    """Report a stage from a Pipes payload: its log line, the materialization, then every check."""
    if report.log:
        pipes.log.info(report.log)
    pipes.report_asset_materialization(metadata=pipes_metadata(report.metadata))
    for check in report.checks:
        pipes.report_asset_check(check_name=check.name, passed=check.passed,
                                 severity="WARN" if check.warn_only else "ERROR",
                                 metadata=pipes_metadata(check.metadata))
