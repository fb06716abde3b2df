"""Stage reports (curation.report.StageReport) as Dagster materialization results: one conversion, whether the
stage ran in this process or as a Pipes payload on the compute resource."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dagster as dg

from curation.report import StageReport

_KINDS = {
    "int": dg.MetadataValue.int,
    "float": dg.MetadataValue.float,
    "text": dg.MetadataValue.text,
    "md": dg.MetadataValue.md,
    "path": dg.MetadataValue.path,
    "json": dg.MetadataValue.json,
    "bool": dg.MetadataValue.bool,
}


def typed_metadata(metadata: Mapping[str, tuple[str, Any]]) -> dict[str, dg.MetadataValue]:
    """A report's {key: (type, value)} metadata as Dagster metadata values."""
    return {k: _KINDS[t](v) for k, (t, v) in metadata.items()}


def stage_result(context: dg.AssetExecutionContext, report: StageReport) -> dg.MaterializeResult:
    """The MaterializeResult of a stage run in process (its log line goes to the run's log)."""
    if report.log:
        context.log.info(report.log)
    return dg.MaterializeResult(
        metadata=typed_metadata(report.metadata),
        check_results=[
            dg.AssetCheckResult(check_name=c.name, passed=c.passed, metadata=typed_metadata(c.metadata),
                                severity=dg.AssetCheckSeverity.WARN if c.warn_only else dg.AssetCheckSeverity.ERROR)
            for c in report.checks
        ],
    )


def dispatched_result(invocation: Any, what: str, extra: Mapping[str, dg.MetadataValue] | None = None
                      ) -> dg.MaterializeResult:
    """The MaterializeResult of a stage run as a payload on the compute resource: the report it sent through
    Pipes (`curation.report.send`), exactly one materialization plus its checks; `extra` metadata added (what the
    payload cannot know, such as a link into a service)."""
    results = invocation.get_results()
    materializations = [r for r in results if isinstance(r, dg.MaterializeResult)]
    if len(materializations) != 1:
        raise dg.Failure(f"the {what} payload reported {len(materializations)} materializations, expected 1")
    checks = [r for r in results if isinstance(r, dg.AssetCheckResult)]
    return dg.MaterializeResult(metadata={**(materializations[0].metadata or {}), **(extra or {})},
                                check_results=checks)


def explorer_link(url: str | None) -> dict[str, dg.MetadataValue]:
    """The `explorer` metadata entry, a link to the explorer (`curation serve`) over this lake; none without one."""
    return {"explorer": dg.MetadataValue.url(url)} if url else {}
