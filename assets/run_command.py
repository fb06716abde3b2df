"""`curation run`'s command line, registered through the `curation.commands` entry point.

Registering it imports nothing but argparse: Dagster and the definitions load only when `run` executes,
so every other `curation` command starts fast and works whatever the Dagster settings say.
"""

from __future__ import annotations

import argparse
import os
from typing import Any


def add_run_command(sub: Any) -> None:
    """Add the `run` subparser to the `curation` command's subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "run", help="materialize every asset for every partition of a crawl, in process"
    )
    p.add_argument("--crawl-root", required=True, help="folder or URL holding crawl-data/<CRAWL>/wat.paths.gz")
    p.add_argument("--lake", required=True, help="lake root (folder or fsspec URL)")
    p.add_argument("--dagster-home", default=None, help="persistent DAGSTER_HOME so the runs show in the UI")
    p.add_argument("--crawl", action="append", default=None, help="crawl id (default: every crawl found)")
    p.add_argument(
        "--allow-loopback",
        action="store_true",
        help="let the downloader reach 127.0.0.0/8 (the sample web); off by default",
    )
    p.add_argument(
        "--clip-spec",
        default=os.environ.get("CURATION_CLIP_SPEC"),
        help="models spec JSON for the clip asset (default $CURATION_CLIP_SPEC, else ViT-B-32/openai)",
    )
    p.add_argument("--clip-device", default=os.environ.get("CURATION_CLIP_DEVICE", "auto"))
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from assets.runner import run_from_args  # Dagster, the assets and the resources load here

    return run_from_args(args)
