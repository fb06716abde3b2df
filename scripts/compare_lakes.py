#!/usr/bin/env python3
"""Compare two lakes file by file: the check that a refactor left the pipeline's output unchanged.

    .venv/bin/python scripts/compare_lakes.py LAKE_A LAKE_B [--root A_PREFIX=B_PREFIX ...]

Parquet tables are compared row for row (sorted by every column, so row order written by parallel workers does
not matter), .npy arrays and every other file byte for byte, tars member by member, JSON files key by key
without timing fields (seconds, durations, throughputs, latencies, timestamps, marker-mtime digests). Paths of
the two checkouts inside values are made equal first (`--root`, plus the lakes' own roots). Exits 1 listing
every difference, 0 when none.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# JSON keys whose values are measurements of the run, not of the data: timings, timestamps, and dedupe's input
# digests (they hash the upstream markers' modification times on purpose, so any rerun upstream counts as new).
TIMING = re.compile(r"(seconds|duration|_s$|_ms|_ms_|per_s|_at$|time|p50|p99|started|finished|created|unix|^input$)",
                    re.IGNORECASE)


def _normalise(value: Any, roots: list[tuple[str, str]]) -> Any:
    if isinstance(value, str):
        for a, b in roots:
            value = value.replace(a, b)
        return value
    if isinstance(value, dict):
        return {k: _normalise(v, roots) for k, v in value.items() if not TIMING.search(k)}
    if isinstance(value, list):
        return [_normalise(v, roots) for v in value]
    return value


def _table(path: Path, roots: list[tuple[str, str]]) -> list[tuple[Any, ...]]:
    table: pa.Table = pq.read_table(path)
    rows = [tuple(_normalise(v, roots) for v in row.values()) for row in table.to_pylist()]
    return sorted(rows, key=repr)


def _tar(path: Path) -> list[tuple[str, bytes]]:
    """Members and their bytes, by name: download threads finish (and append) in any order."""
    with tarfile.open(path) as tar:
        return sorted((m.name, tar.extractfile(m).read() if m.isfile() else b"")  # type: ignore[union-attr]
                      for m in tar)


def compare(a: Path, b: Path, roots: list[tuple[str, str]]) -> list[str]:
    """Every difference between lake `a` and lake `b` (empty when equal)."""
    problems = []
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    problems += [f"only in {a}: {p}" for p in sorted(files_a - files_b)]
    problems += [f"only in {b}: {p}" for p in sorted(files_b - files_a)]
    for rel in sorted(files_a & files_b):
        fa, fb = a / rel, b / rel
        if fa.suffix == ".parquet":
            ta, tb = pq.read_schema(fa), pq.read_schema(fb)
            if ta.names != tb.names:
                problems.append(f"{rel}: columns {ta.names} != {tb.names}")
            elif _table(fa, roots) != _table(fb, []):
                problems.append(f"{rel}: rows differ")
        elif fa.suffix == ".json":
            if _normalise(json.loads(fa.read_text()), roots) != _normalise(json.loads(fb.read_text()), []):
                problems.append(f"{rel}: JSON differs (timing fields ignored)")
        elif fa.suffix == ".npy":
            if not np.array_equal(np.load(fa), np.load(fb)):
                problems.append(f"{rel}: array differs")
        elif fa.suffix == ".tar":
            if _tar(fa) != _tar(fb):
                problems.append(f"{rel}: tar members differ")
        elif fa.read_bytes() != fb.read_bytes():
            problems.append(f"{rel}: bytes differ")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lake_a", type=Path)
    parser.add_argument("lake_b", type=Path)
    parser.add_argument("--root", action="append", default=[], metavar="A=B",
                        help="a path prefix of checkout A that reads B in checkout B (repeatable)")
    args = parser.parse_args(argv)
    roots = [(str(args.lake_a.resolve()), str(args.lake_b.resolve()))]
    roots += [tuple(r.split("=", 1)) for r in args.root]  # type: ignore[misc]
    problems = compare(args.lake_a, args.lake_b, roots)
    files = sum(1 for p in args.lake_a.rglob("*") if p.is_file())
    for p in problems:
        print(p)
    print(f"{files} files compared, {len(problems)} differences")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
