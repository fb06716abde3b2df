"""Helpers that turn stage statistics into Dagster materialization metadata."""

from __future__ import annotations

from collections.abc import Mapping

import dagster as dg


def counts_table(counts: Mapping[str, int], title: str = "reason") -> dg.MetadataValue:
    """A markdown table of counts, largest first."""
    lines = [f"| {title} | count |", "|---|---:|"]
    lines += [f"| {k} | {v:,} |" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return dg.MetadataValue.md("\n".join(lines))
