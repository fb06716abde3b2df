"""Helpers that turn stage statistics into Dagster materialization metadata."""

from __future__ import annotations

from collections.abc import Mapping

import dagster as dg

from curation.plots import counts_markdown


def counts_table(counts: Mapping[str, int], title: str = "reason") -> dg.MetadataValue:
    """A markdown table of counts, largest first."""
    return dg.MetadataValue.md(counts_markdown(counts, title))
