"""curation.report: a stage report's types are checked, and a payload hands it to Pipes in one shape."""

from __future__ import annotations

from typing import Any

import pytest

from curation.report import CheckOutcome, StageReport, pipes_metadata, problems_check, send


class RecordingPipes:
    """A hand-written stand-in for dagster_pipes' context: it records what a payload reports."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.log = self

    def info(self, message: str) -> None:
        self.calls.append(("log", message))

    def report_asset_materialization(self, *, metadata: Any = None) -> None:
        self.calls.append(("materialization", metadata))

    def report_asset_check(self, check_name: str, passed: bool, severity: Any = None, metadata: Any = None) -> None:
        self.calls.append(("check", (check_name, passed, severity, metadata)))


def test_pipes_metadata_keeps_types() -> None:
    assert pipes_metadata({"n": ("int", 3), "t": ("md", "| a |")}) == {
        "n": {"raw_value": 3, "type": "int"}, "t": {"raw_value": "| a |", "type": "md"}}


def test_send_reports_log_materialization_and_every_check_with_its_severity() -> None:
    report = StageReport({"rows": ("int", 7)}, [problems_check("aligned", []),
                                                CheckOutcome("band", False, {"rate": ("float", 0.2)}, warn_only=True)],
                         log="7 rows")
    pipes = RecordingPipes()
    send(report, pipes)
    assert pipes.calls == [
        ("log", "7 rows"),
        ("materialization", {"rows": {"raw_value": 7, "type": "int"}}),
        ("check", ("aligned", True, "ERROR", {"problems": {"raw_value": "none", "type": "text"}})),
        ("check", ("band", False, "WARN", {"rate": {"raw_value": 0.2, "type": "float"}})),
    ]


def test_problems_check_fails_on_problems_and_keeps_the_first_ones() -> None:
    check = problems_check("c", [f"p{i}" for i in range(30)], limit=3)
    assert not check.passed and check.metadata["problems"] == ("text", "p0\np1\np2")


def test_unknown_metadata_types_are_refused() -> None:
    with pytest.raises(ValueError, match="metadata types"):
        StageReport({"x": ("table", 1)})
    with pytest.raises(ValueError, match=r"c\.y"):
        StageReport({}, [CheckOutcome("c", True, {"y": ("blob", b"")})])
