"""Storage helpers: atomic writes and success markers on local paths or any fsspec URL."""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from curation.layout import SUCCESS_MARKER, Partition, join


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a path or URL, plus the path as that filesystem spells it."""
    fs, p = fsspec.core.url_to_fs(path)
    return fs, p


def is_local(path: str) -> bool:
    """True for plain paths and file:// URLs (decided from the protocol, without opening anything)."""
    return fsspec.utils.get_protocol(path) in ("file", "local")


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary sibling path; on success move it over `path` (atomic on local disks).

    Temporaries that earlier writes of the same `path` left behind are removed first: a killed process never
    reaches the cleanup below, and its partial `.tmp-…-<name>` would otherwise stay forever, matched by any
    glob of the folder (fsspec's `*` matches dot files). One writer per path at a time, as for the rename.
    """
    fs, p = filesystem(path)
    parent, name = p.rsplit("/", 1)
    fs.makedirs(parent, exist_ok=True)
    for stale in fs.ls(parent, detail=False):
        if _is_temp_of(str(stale).rstrip("/").rsplit("/", 1)[-1], name):
            fs.rm(stale, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{name}"
    try:
        yield tmp
        if isinstance(fs, LocalFileSystem):
            os.replace(tmp, p)
        else:
            fs.mv(tmp, p)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)


def _is_temp_of(entry: str, name: str) -> bool:
    """Whether a folder entry is an `atomic_path` temporary of the file `name` (`.tmp-<32 hex>-<name>`)."""
    prefix, _, rest = entry.partition("-")
    token, _, target = rest.partition("-")
    return prefix == ".tmp" and target == name and len(token) == 32 and all(c in "0123456789abcdef" for c in token)


def write_parquet(table: pa.Table, path: str) -> None:
    """Write a parquet table atomically (zstd)."""
    fs, _ = filesystem(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", filesystem=fs)


def write_bytes(data: bytes, path: str) -> None:
    fs, _ = filesystem(path)
    with atomic_path(path) as tmp, fs.open(tmp, "wb") as f:
        f.write(data)


def read_npy(path: str) -> np.ndarray:
    """A .npy array from a local path or fsspec URL (no pickles)."""
    fs, p = filesystem(path)
    with fs.open(p, "rb") as f:
        return np.load(f, allow_pickle=False)


def open_npy(path: str) -> np.ndarray:
    """A .npy array memory-mapped for local files (nothing is read until sliced), else read whole."""
    if is_local(path):
        return np.load(filesystem(path)[1], mmap_mode="r", allow_pickle=False)
    return read_npy(path)


def write_json(obj: Any, path: str) -> None:
    write_bytes(json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), path)


def read_json(path: str) -> Any:
    fs, p = filesystem(path)
    with fs.open(p, "rb") as f:
        return json.loads(f.read())


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return bool(fs.exists(p))


def remove(path: str) -> None:
    fs, p = filesystem(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def write_marker(partition_dir: str, stats: dict[str, Any]) -> None:
    """Write the success marker last: its presence means every other file of the partition is final."""
    write_json(stats, join(partition_dir, SUCCESS_MARKER))


def read_marker(partition_dir: str) -> dict[str, Any] | None:
    path = join(partition_dir, SUCCESS_MARKER)
    return read_json(path) if exists(path) else None


def require_finished(partition_dir: str, what: str) -> None:
    """Refuse to read a partition that has no success marker (never written, or left by a killed run)."""
    if not exists(join(partition_dir, SUCCESS_MARKER)):
        raise FileNotFoundError(f"{what} is not finished: no {SUCCESS_MARKER} in {partition_dir}; materialize "
                                f"{what.split(' ', 1)[0]} for this partition first")


def clear_partition(partition_dir: str) -> None:
    """Remove a partition folder before it is rebuilt, so a rerun replaces it exactly."""
    remove(partition_dir)


def file_sha256(path: str) -> str:
    """The sha256 hex digest of a file, read in 1 MiB chunks."""
    fs, p = filesystem(path)
    h = hashlib.sha256()
    with fs.open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_int_column(paths: list[str], column: str) -> set[int]:
    """The distinct values of an integer column across parquet files (e.g. uids of earlier partitions)."""
    out: set[int] = set()
    for path in paths:
        fs, p = filesystem(path)
        values = pq.read_table(p, columns=[column], filesystem=fs).column(column).to_numpy()
        out.update(values.tolist())
    return out


def _finished_partition_dirs(stage_dir: str) -> tuple[fsspec.AbstractFileSystem, list[tuple[Partition, str, set[str]]]]:
    """Every `crawl=…/segment=…` folder under a stage folder that holds a success marker, sorted by path:
    its partition, its path as the filesystem spells it, and the names of the files in it.

    Found by listing the stage folder three levels deep, never by globbing: a lake path holding `[`, `]`,
    `*` or `?` is a plain path, where a glob pattern would read `[...]` as a character class and match nothing.
    """
    fs, root = filesystem(stage_dir)
    root = root.rstrip("/")
    files: dict[str, set[str]] = {}
    for path in fs.find(root, maxdepth=3):
        rel = str(path)[len(root) + 1:].split("/") if str(path).startswith(f"{root}/") else []
        if len(rel) == 3 and rel[0].startswith("crawl=") and rel[1].startswith("segment="):
            files.setdefault(f"{root}/{rel[0]}/{rel[1]}", set()).add(rel[2])
    out = []
    for part_dir, names in sorted(files.items()):
        if SUCCESS_MARKER not in names:
            continue  # unfinished (a killed run or a rerun in progress): invisible to readers
        crawl_dir, segment_dir = part_dir.rsplit("/", 2)[1:]
        try:
            part = Partition(crawl_dir.split("=", 1)[1], segment_dir.split("=", 1)[1])
        except ValueError:
            continue  # not a folder the lake's writers make
        out.append((part, part_dir, names))
    return fs, out


def finished_tables(stage_dir: str, table_name: str, exclude_dir: str | None = None) -> list[str]:
    """Table files of every partition under a stage folder whose success marker exists (sorted by path;
    local paths, or URLs for remote filesystems). `exclude_dir` leaves one partition folder out."""
    fs, dirs = _finished_partition_dirs(stage_dir)
    excluded = filesystem(exclude_dir)[1].rstrip("/") if exclude_dir is not None else None
    out = []
    for _, part_dir, names in dirs:
        if part_dir == excluded or table_name not in names:
            continue
        table = f"{part_dir}/{table_name}"
        out.append(fs.unstrip_protocol(table) if not isinstance(fs, LocalFileSystem) else table)
    return out


def finished_partitions(stage_dir: str) -> list[Partition]:
    """The (crawl, segment) partitions under a stage folder whose success marker exists, sorted by path."""
    return [part for part, _, _ in _finished_partition_dirs(stage_dir)[1]]
