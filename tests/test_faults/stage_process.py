"""Run one stage in a real process that SIGKILLs its own process group at a chosen write boundary.

`python -m tests.test_faults.stage_process` is a fork server: it imports the stages once (torch, img2dataset,
open_clip, faiss: ~10 s of imports that every fault case would otherwise pay again), then reads one JSON job per
line on stdin. For each job it forks a child that calls `os.setsid()` (its own session and process group, like
`subprocess.Popen(start_new_session=True)`), so the test can `os.killpg` it with img2dataset's pool workers and
multiprocessing's resource tracker, and check that nothing of that group survives. The server answers
`{"pid": …}` right after the fork and `{"pid": …, "exit": …, "signal": …, "seconds": …}` once the child is gone.

In the child, before the stage runs, the write boundaries (BOUNDARIES) are wrapped by a counter that logs every
call to a trace file and, in kill mode, sends SIGKILL to the child's process group on the Nth call, before or
after the real call. That is all the instrumentation: the stage code is the library's, unchanged, writing to a
real filesystem. Nothing here patches `curation/` for good; wrappers live only in the forked child.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

# (module, attribute): the calls through which the stages' write paths put, rename and remove files.
BOUNDARIES: tuple[tuple[str, str], ...] = (
    ("os", "replace"),
    ("os", "rename"),
    ("os", "remove"),
    ("os", "unlink"),
    ("shutil", "rmtree"),
    ("pyarrow.parquet", "write_table"),
    ("numpy", "save"),
    ("faiss", "write_index"),
    ("curation.io", "write_marker"),
)
KILL_WHEN = ("before", "after")


def run_stage(job: dict[str, Any]) -> dict[str, Any]:
    """Run one stage as the job describes it; return a small JSON-able summary."""
    from curation.layout import Partition

    stage = job["stage"]
    lake = job["lake"]
    if stage == "pairs":
        from curation.stages import materialize_pairs

        report = materialize_pairs(lake, job["crawl_root"], Partition(*job["partition"]))
        return {"rows": report.metadata["dagster/row_count"][1]}
    if stage == "downloads":
        from curation.stages import materialize_downloads

        report = materialize_downloads(lake, Partition(*job["partition"]), job["options"])
        return {"rows": report.metadata["dagster/row_count"][1]}
    if stage == "clip":
        import open_clip
        import torch

        from curation.scoring import ScoringConfig, score_partition

        open_clip.add_model_config(job["model_config"])  # the tiny random-init architecture, by file
        torch.manual_seed(0)  # random init: the same weights in every run, so reruns compare to the reference
        config = ScoringConfig.from_spec(job["spec"], **job["clip_overrides"])
        scored = score_partition(lake, Partition(*job["partition"]), config)
        return {"rows": scored.table.num_rows, "kept": scored.clip_pass.n_kept}
    if stage == "dedupe":
        from curation.dedupe import DedupeConfig, dedupe_lake

        deduped = dedupe_lake(lake, [Partition(*p) for p in job["partitions"]], DedupeConfig(**job.get("config", {})))
        return {"nodes": deduped.nodes, "clusters": deduped.clusters, "generation": deduped.generation}
    if stage == "index":
        from curation.index import IndexConfig, build_index

        built = build_index(lake, IndexConfig(**job.get("config", {})))
        return {"vectors": built.vectors, "generation": built.generation}
    if stage == "subset":
        from curation.subsets import SubsetDefinition, export_subset

        release = export_subset(lake, SubsetDefinition.from_mapping(job["definition"]), job.get("overrides"))
        return {"rows": release.rows, "release": release.release}
    raise ValueError(f"unknown stage {stage!r}")


class _Boundaries:
    """Counts calls of the wrapped functions; kills the process group at call `kill_at` (1-based)."""

    def __init__(self, trace_path: str, lake: str, kill_at: int | None, when: str) -> None:
        self.fd = os.open(trace_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.lake = lake.rstrip("/") + "/"
        self.kill_at = kill_at
        self.when = when
        self.calls = 0
        self.started = time.monotonic()

    def note(self, text: str) -> None:
        os.write(self.fd, (text + "\n").encode())  # a raw write: never through a wrapped function

    def wrap(self, name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def boundary(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            n = self.calls
            # The first path argument (write_table's and save's come second), on one line.
            target = next((os.fspath(a) for a in args if isinstance(a, str | os.PathLike)), "")
            target = target.replace("\t", " ").replace("\n", " ")
            self.note(f"{n}\t{name}\t{target.replace(self.lake, '')}\t{time.monotonic() - self.started:.4f}")
            if n == self.kill_at and self.when == "before":
                self.kill(n, name)
            out = real(*args, **kwargs)
            if n == self.kill_at and self.when == "after":
                self.kill(n, name)
            return out

        boundary.__wrapped__ = real  # type: ignore[attr-defined]
        return boundary

    def kill(self, n: int, name: str) -> None:
        self.note(f"KILL\t{n}\t{name}\t{self.when}")
        os.killpg(0, signal.SIGKILL)  # this process and everything it started: pool workers, resource tracker
        time.sleep(60)  # never reached: SIGKILL cannot be caught

    def install(self) -> None:
        import importlib

        for module_name, attr in BOUNDARIES:
            module = importlib.import_module(module_name)
            real = getattr(module, attr)
            wrapper = self.wrap(f"{module_name}.{attr}", real)
            setattr(module, attr, wrapper)
            # `from curation.io import write_marker` binds the function in the importing module too.
            for name, mod in list(sys.modules.items()):
                if name.startswith("curation") and mod is not None and getattr(mod, attr, None) is real:
                    setattr(mod, attr, wrapper)


def _child(job: dict[str, Any]) -> None:
    """The forked child: own process group, quiet stdio, wrappers, the stage, a result file. Never returns."""
    code = 1
    try:
        os.setsid()
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        if job.get("trace"):
            _Boundaries(job["trace"], job["lake"], job.get("kill_at"), job.get("when", "before")).install()
        out = run_stage(job)
        with open(job["result"], "w", encoding="utf-8") as f:
            json.dump(out, f)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _warm_imports() -> None:
    """Import what every stage needs before any fork, so children start in milliseconds. Nothing runs here:
    no thread pool of torch, polars or arrow is started before a fork."""
    import curation.dedupe
    import curation.index
    import curation.scoring
    import curation.stages
    import curation.subsets  # noqa: F401


def serve() -> None:
    _warm_imports()
    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _child(job)
        out.write(json.dumps({"pid": pid}) + "\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        out.write(json.dumps({"pid": pid, "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                              "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                              "seconds": time.monotonic() - started}) + "\n")
        out.flush()


if __name__ == "__main__":
    serve()
