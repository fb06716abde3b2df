"""Project settings read from the environment once, at the edge (never inside `curation/`)."""

from __future__ import annotations

import errno
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curation.io import is_local
from curation.layout import CC_HTTPS_ROOT
from curation.models import SPEC_KEYS

COMPUTE_MODES = ("local", "slurm")
CPU_STAGE_PLACES = ("process", "compute")
# Slurm's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_WALLTIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")
_SLURM_ENV_HINT = ('for the local cluster: scripts/slurm.sh up && scripts/slurm-env.sh && '
                   'eval "$(scripts/slurm.sh env)"; on a real cluster see README "Running on SLURM"')


@dataclass(frozen=True)
class SlurmSettings:
    """How the `slurm` deployment reaches the cluster: an SSH login (key *path* only, strict host keys
    against `known_hosts`), the queue (partition, GPU partition, account, qos, default walltime, CPUs and
    memory per job), `remote_base` (run directories, on storage the compute nodes share) and `env_path`
    (the pre-deployed job environment that scripts/slurm-env.sh builds: `<env_path>/activate.sh` and
    `<env_path>/env/bin/python`, on the cluster's side)."""

    host: str
    user: str
    key_path: str
    known_hosts: str
    remote_base: str
    env_path: str
    port: int = 22
    partition: str = ""
    gpu_partition: str = ""
    account: str | None = None
    qos: str | None = None
    walltime: str = "01:00:00"
    cpus: int = 2
    mem: str = "4G"

    def __post_init__(self) -> None:
        missing = [name for name in ("host", "user", "key_path", "known_hosts", "remote_base", "env_path")
                   if not getattr(self, name)]
        if missing:
            raise ValueError(f"SLURM deployment: {', '.join(missing)} not set ({_SLURM_ENV_HINT})")
        for what, path in (("SSH key", self.key_path), ("known_hosts file", self.known_hosts)):
            if not Path(path).expanduser().is_file():
                raise ValueError(f"SLURM deployment: {what} {path} does not exist ({_SLURM_ENV_HINT})")
        for what, path in (("remote_base", self.remote_base), ("env_path", self.env_path)):
            if not path.startswith("/"):
                raise ValueError(f"SLURM deployment: {what} must be an absolute path on the cluster, got {path!r}")
        if not _WALLTIME.match(self.walltime):
            raise ValueError(f"SLURM deployment: walltime {self.walltime!r} is not a Slurm time limit "
                             "(e.g. 01:00:00, 90, 1-00:00:00)")
        if not 0 < self.port < 65536 or self.cpus < 1:
            raise ValueError(f"SLURM deployment: bad port {self.port} or cpus {self.cpus}")

    @classmethod
    def from_env(cls) -> SlurmSettings:
        """CURATION_SLURM_HOST, _PORT (22), _USER, _KEY (path of the private key), _KNOWN_HOSTS, _REMOTE_BASE,
        _ENV (pre-deployed environment), _PARTITION, _GPU_PARTITION (partition for steps that request
        GPUs; default: _PARTITION), _ACCOUNT, _QOS, _WALLTIME (default job time limit, 01:00:00),
        _JOB_CPUS (2), _JOB_MEM (4G). Every missing required variable is named in one error."""
        env = {name: os.environ.get(f"CURATION_SLURM_{name}", "").strip() for name in (
            "HOST", "PORT", "USER", "KEY", "KNOWN_HOSTS", "REMOTE_BASE", "ENV", "PARTITION", "GPU_PARTITION",
            "ACCOUNT", "QOS", "WALLTIME", "JOB_CPUS", "JOB_MEM")}
        missing = [f"CURATION_SLURM_{n}" for n in ("HOST", "USER", "KEY", "KNOWN_HOSTS", "REMOTE_BASE", "ENV")
                   if not env[n]]
        if missing:
            raise ValueError(f"CURATION_COMPUTE=slurm needs {', '.join(missing)} ({_SLURM_ENV_HINT})")
        try:
            port, cpus = int(env["PORT"] or 22), int(env["JOB_CPUS"] or 2)
        except ValueError as e:
            raise ValueError(f"CURATION_SLURM_PORT and CURATION_SLURM_JOB_CPUS must be integers: {e}") from None
        return cls(
            host=env["HOST"], user=env["USER"], key_path=env["KEY"], known_hosts=env["KNOWN_HOSTS"],
            remote_base=env["REMOTE_BASE"], env_path=env["ENV"], port=port, partition=env["PARTITION"],
            gpu_partition=env["GPU_PARTITION"] or env["PARTITION"], account=env["ACCOUNT"] or None,
            qos=env["QOS"] or None, walltime=env["WALLTIME"] or "01:00:00", cpus=cpus, mem=env["JOB_MEM"] or "4G",
        )


@dataclass(frozen=True)
class Settings:
    """Where the lake and the crawl listings live, and how compute is dispatched (`compute`: `local`, or
    `slurm` with `slurm` describing the cluster)."""

    lake_root: str
    crawl_root: str
    compute: str = "local"
    crawls: tuple[str, ...] = ()
    allow_loopback: bool = False
    clip_spec: str | None = None
    clip_device: str = "auto"
    clip_gpus: int | None = None  # None: 1 under the slurm deployment (the GPU stages ask for a GPU), else 0
    index_gpus: int | None = None  # the same default for the index build (k-means on the GPU with faiss-gpu)
    subsets_registry: str | None = None
    subset_cron: str = "0 4 * * *"
    cpu_stages: str = "process"  # "compute": pairs and downloads run as jobs on the compute resource too
    slurm: SlurmSettings | None = None
    explorer_url: str | None = None  # where `curation serve` runs the explorer; the index asset links to it

    def __post_init__(self) -> None:
        if self.compute not in COMPUTE_MODES:
            raise ValueError(f"CURATION_COMPUTE must be one of {', '.join(COMPUTE_MODES)}, got {self.compute!r}: "
                             "unset it to run in process, or see README 'Running on SLURM'")
        if self.cpu_stages not in CPU_STAGE_PLACES:
            raise ValueError(f"CURATION_CPU_STAGES must be one of {', '.join(CPU_STAGE_PLACES)}, "
                             f"got {self.cpu_stages!r}")
        if self.explorer_url is not None and not self.explorer_url.startswith(("http://", "https://")):
            raise ValueError(f"CURATION_EXPLORER_URL must be an http(s) URL (where `curation serve` runs), "
                             f"got {self.explorer_url!r}")
        for name in ("clip_gpus", "index_gpus"):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, 1 if self.compute == "slurm" else 0)
            elif value < 0:
                raise ValueError(f"CURATION_{name.upper()} must be >= 0, got {value}")
        if self.compute == "slurm" and self.slurm is None:
            # Settings built field by field (`curation run`) take the cluster from the environment too.
            object.__setattr__(self, "slurm", SlurmSettings.from_env())

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """CURATION_LAKE, CURATION_CRAWL_ROOT, CURATION_COMPUTE (local or slurm; slurm reads CURATION_SLURM_*,
        see `SlurmSettings.from_env`), CURATION_CRAWLS (comma list),
        CURATION_ALLOW_LOOPBACK (a boolean, see `env_flag`: on lets the downloader reach 127.0.0.0/8, for the
        sample web), CURATION_CLIP_SPEC (models spec JSON for the clip asset), CURATION_CLIP_DEVICE (auto, cpu,
        cuda), CURATION_CLIP_GPUS / CURATION_INDEX_GPUS (GPUs each clip / index job requests; default 1 under
        slurm, else 0), CURATION_SUBSETS (a YAML/JSON registry of extra subset definitions), CURATION_CPU_STAGES
        (process, or compute to run pairs and downloads as jobs on the compute resource too),
        CURATION_SUBSET_CRON (when the subset_refresh schedule re-exports the subsets; default daily at 04:00),
        CURATION_EXPLORER_URL (the explorer `curation serve` runs over this lake, e.g. http://127.0.0.1:1234/; the
        index asset's metadata links to it).

        `overrides` are field values that replace the environment's (`curation run`'s flags); the variables
        they replace are not read. The values are validated on construction; `check` looks at the files."""
        readers: dict[str, Callable[[], Any]] = {
            "lake_root": lambda: os.environ.get("CURATION_LAKE") or str(Path(".data/lake").absolute()),
            "crawl_root": lambda: os.environ.get("CURATION_CRAWL_ROOT") or CC_HTTPS_ROOT,
            "compute": lambda: os.environ.get("CURATION_COMPUTE", "local"),
            "crawls": lambda: tuple(c.strip() for c in os.environ.get("CURATION_CRAWLS", "").split(",") if c.strip()),
            "allow_loopback": lambda: env_flag("CURATION_ALLOW_LOOPBACK"),
            "clip_spec": lambda: os.environ.get("CURATION_CLIP_SPEC") or None,
            "clip_device": lambda: os.environ.get("CURATION_CLIP_DEVICE", "auto"),
            "clip_gpus": lambda: gpus_from_env("CURATION_CLIP_GPUS"),
            "index_gpus": lambda: gpus_from_env("CURATION_INDEX_GPUS"),
            "subsets_registry": lambda: os.environ.get("CURATION_SUBSETS") or None,
            "subset_cron": lambda: os.environ.get("CURATION_SUBSET_CRON") or "0 4 * * *",
            "cpu_stages": lambda: os.environ.get("CURATION_CPU_STAGES") or "process",
            "explorer_url": lambda: os.environ.get("CURATION_EXPLORER_URL", "").strip() or None,
        }
        unknown = sorted(set(overrides) - set(readers))
        if unknown:
            raise TypeError(f"Settings.from_env: unknown overrides {unknown}")
        return cls(**{name: overrides[name] if name in overrides else read() for name, read in readers.items()})

    def check(self) -> None:
        """Fail now, with the variable to fix, rather than at the step that needs it: a local lake must be
        writable, the models spec must be a readable spec and the subsets registry must load. Object-store
        lakes are not probed (that would need credentials and a round trip)."""
        problem = lake_write_problem(self.lake_root)
        if problem:
            raise ValueError(f"CURATION_LAKE: cannot write to the lake at {self.lake_root} ({problem}); point "
                             "CURATION_LAKE (or `curation run --lake`) at a folder you can write")
        if self.clip_spec is not None:
            read_models_spec(self.clip_spec)
        if self.subsets_registry is not None:
            from curation.subsets import load_registry

            try:
                load_registry(self.subsets_registry)
            except Exception as exc:  # any way the file fails to load: missing, not YAML/JSON, a bad definition
                detail = " ".join(str(exc).split())
                raise ValueError(f"CURATION_SUBSETS: cannot load the subsets registry {self.subsets_registry} "
                                 f"({detail}); fix it or unset CURATION_SUBSETS") from None


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")


def env_flag(name: str) -> bool:
    """A boolean variable, case-insensitive: 1/true/yes/on, or 0/false/no/off/empty (the default when unset).
    Anything else is refused rather than read as off."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise ValueError(f"{name} must be a boolean ({'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS[:-1])}), "
                     f"got {raw!r}")


def lake_write_problem(root: str) -> str | None:
    """Why the stages could not write under a local lake root (the OS error), or None when they could.
    The lake need not exist yet: then its nearest existing parent must be a writable folder. Nothing is
    created; URLs of other filesystems (s3://…) are not checked."""
    if not is_local(root):
        return None
    path = Path(root.removeprefix("file://")).expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    code = None
    if not existing.is_dir():
        code = errno.ENOTDIR
    elif not os.access(existing, os.W_OK | os.X_OK):
        code = errno.EROFS if os.statvfs(existing).f_flag & os.ST_RDONLY else errno.EACCES
    return None if code is None else f"[Errno {code}] {os.strerror(code)}: {existing}"


_SPEC = "CURATION_CLIP_SPEC"


def read_models_spec(path: str) -> dict[str, Any]:
    """A models spec file (see `curation.scoring.ScoringConfig.from_spec`), checked for what can be checked
    without loading a model: the file exists and is a JSON object, its keys are known, it names a model, and
    the head checkpoints it lists exist. Errors name CURATION_CLIP_SPEC, the file and the fix."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{_SPEC}: the models spec {path} does not exist; write one (`curation "
                                "train-toy-clip SAMPLE_WEB --spec-out spec.json` for the sample web) or unset "
                                f"{_SPEC} (or --clip-spec) for ViT-B-32/openai")
    try:
        spec = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{_SPEC}: the models spec {path} is not valid JSON: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{_SPEC}: cannot read the models spec {path}: {exc}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{_SPEC}: the models spec {path} must be a JSON object (model_name, pretrained, ...), "
                         f"not a {type(spec).__name__}")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ValueError(f"{_SPEC}: the models spec {path} has unknown keys {unknown}; known: "
                         f"{sorted(SPEC_KEYS)}")
    if not spec.get("model_name"):
        raise ValueError(f"{_SPEC}: the models spec {path} needs 'model_name' (an open_clip model name, e.g. "
                         "ViT-B-32)")
    heads = spec.get("heads") or {}
    if not isinstance(heads, dict):
        raise ValueError(f"{_SPEC}: 'heads' in the models spec {path} must map a kind to a checkpoint path")
    missing = sorted(f"{kind}: {head}" for kind, head in heads.items() if not Path(str(head)).is_file())
    if missing:
        raise FileNotFoundError(f"{_SPEC}: head checkpoints in the models spec {path} do not exist: {missing}")
    return spec


def gpus_from_env(name: str) -> int | None:
    """A GPU-count variable (CURATION_CLIP_GPUS, CURATION_INDEX_GPUS) as an integer; None when unset."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
