"""The test side of the fault runs: drive the fork server, choose kill points, check that a killed group is gone."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curation.dedupe import STATE_FILE
from curation.index import MANIFEST_FILE
from curation.layout import SUCCESS_MARKER
from curation.subsets import LATEST_FILE
from tests.test_faults.stage_process import KILL_WHEN

ROOT = Path(__file__).resolve().parents[2]
COMMIT_FILES = (SUCCESS_MARKER, STATE_FILE, MANIFEST_FILE, LATEST_FILE)


@dataclass(frozen=True)
class Boundary:
    """One wrapped call the stage made: its 1-based number, the function and its first argument."""

    n: int
    op: str
    target: str
    at_s: float  # seconds since the stage process started


@dataclass(frozen=True)
class Outcome:
    """How one stage process ended."""

    pid: int
    exit: int | None
    signal: int | None
    seconds: float
    trace: list[Boundary]
    killed_at: str  # "N op when" of a deterministic kill, "" otherwise
    survivors: list[str]  # members of the process group still alive after it ended (must be empty)
    group_at_kill: int  # live processes in the group when the test sent a timed SIGKILL (0 when it sent none)
    log: str

    @property
    def killed(self) -> bool:
        return self.signal == signal.SIGKILL


def group_members(pgid: int) -> list[str]:
    """Live (non-zombie) processes in a process group, as 'pid state cmdline'."""
    proc = Path("/proc")
    if not proc.is_dir():  # no procfs: ask the kernel whether the group still exists
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [f"group {pgid}"]
    out = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120]
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            out.append(f"{entry.name} {fields[0]} {cmd}")
    return out


def wait_group_gone(pgid: int, timeout_s: float = 10.0) -> list[str]:
    """Members still alive after up to `timeout_s` (SIGKILL is delivered asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = group_members(pgid)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def read_trace(path: Path) -> tuple[list[Boundary], str]:
    if not path.exists():
        return [], ""
    calls, killed = [], ""
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if parts[0] == "KILL":
            killed = " ".join(parts[1:])
        elif len(parts) == 4:
            calls.append(Boundary(int(parts[0]), parts[1], parts[2], float(parts[3])))
    return calls, killed


class StageServer:
    """A running `tests.test_faults.stage_process` fork server (its own session, killed at close)."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.stderr = open(workdir / "server.log", "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.test_faults.stage_process"], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
                                     env=env, start_new_session=True)

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            log = (self.workdir / "server.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the stage server died:\n{log}")
        return dict(json.loads(line))

    def run(self, job: dict[str, Any], *, trace: bool = False, kill_at: int | None = None, when: str = "before",
            kill_after_s: float | None = None) -> Outcome:
        """Run `job` in a fresh process group. trace: count (and log) the write boundaries; kill_at/when: SIGKILL
        the group at that boundary call; kill_after_s: SIGKILL the group from here after that many seconds."""
        assert when in KILL_WHEN
        name = uuid.uuid4().hex[:12]
        files = {k: self.workdir / f"{name}.{k}" for k in ("trace", "log", "result")}
        full = {**job, "log": str(files["log"]), "result": str(files["result"]),
                "trace": str(files["trace"]) if trace or kill_at is not None else None,
                "kill_at": kill_at, "when": when}
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(full) + "\n")
        self.proc.stdin.flush()
        pid = int(self._reply()["pid"])
        group_at_kill = 0
        if kill_after_s is not None:
            time.sleep(kill_after_s)
            group_at_kill = len(group_members(pid))
            with contextlib.suppress(ProcessLookupError):  # it finished first
                os.killpg(pid, signal.SIGKILL)
        done = self._reply()
        survivors = wait_group_gone(pid)
        calls, killed = read_trace(files["trace"])
        log = files["log"].read_text(errors="replace") if files["log"].exists() else ""
        return Outcome(pid=pid, exit=done["exit"], signal=done["signal"], seconds=float(done["seconds"]),
                       trace=calls, killed_at=killed, survivors=survivors, group_at_kill=group_at_kill, log=log)

    def run_clean(self, job: dict[str, Any]) -> Outcome:
        """Run a job to completion; raise with its log if it fails."""
        out = self.run(job)
        if out.exit != 0:
            raise RuntimeError(f"stage {job['stage']} failed (exit {out.exit}, signal {out.signal}):\n"
                               f"{out.log[-4000:]}")
        return out

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.stderr.close()


def is_commit(call: Boundary) -> bool:
    """The rename that publishes a commit point: a success marker, dedupe's state.json, the index manifest or a
    subset's LATEST.json (atomic_path's temp `.tmp-<hex>-<name>` moved over `<name>`)."""
    return call.op == "os.replace" and call.target.rsplit("/", 1)[-1].endswith(tuple(f"-{n}" for n in COMMIT_FILES))


def kill_points(calls: list[Boundary], budget: int) -> list[tuple[int, str]]:
    """Deterministic kill points (boundary number, before/after) for a stage whose clean run made `calls`.

    Every boundary, both ways, when that fits the budget. Otherwise, in this order until the budget is spent: both
    sides of each commit point (see `is_commit`), after each folder rename (the downloads shard swap), before the
    first call, after the last, then an even spread over the remaining (call, side) pairs.
    """
    everything = [(c.n, w) for c in calls for w in KILL_WHEN]
    if len(everything) <= budget:
        return everything
    chosen: list[tuple[int, str]] = []
    for c in calls:
        if is_commit(c):
            chosen += [(c.n, "before"), (c.n, "after")]
    chosen += [(c.n, "after") for c in calls if c.op == "os.rename"]
    chosen += [(1, "before"), (len(calls), "after")]
    chosen = list(dict.fromkeys(chosen))[:budget]
    spread = budget - len(chosen)
    for i in range(spread):  # evenly over the calls, alternating the side; the nearest free point to each
        aim = (i + 1) * (len(calls) + 1) / (spread + 1)
        side = KILL_WHEN[i % 2]
        free = [p for p in everything if p not in chosen]
        chosen.append(min(free, key=lambda p: (abs(p[0] - aim), p[1] != side)))
    return chosen


def quietest_stretch(calls: list[Boundary], seconds: float) -> tuple[float, float]:
    """The longest time (start, end) in a clean run without a boundary call: where the work between writes happens
    (for downloads, img2dataset's pool of worker processes)."""
    times = [0.0, *(c.at_s for c in calls), seconds]
    return max(itertools.pairwise(times), key=lambda w: w[1] - w[0])
