#!/usr/bin/env bash
# make test: install what the tests need (beyond .venv) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
scripts/system-deps.sh chromium
# The full suite (no test path given) includes the SLURM tests: bring the local cluster up first
# (idempotent). In CI it must come up; elsewhere (no root, no apt) the SLURM tests are skipped, with the reason.
full_suite=1
for arg in "$@"; do [ ! -e "${arg%%::*}" ] || full_suite=0; done  # a test path selects part of the suite
if [ $full_suite = 1 ] && [ -z "${CURATION_SLURM_UNAVAILABLE:-}" ]; then
  if ! scripts/slurm.sh up; then
    [ -z "${CI:-}" ] || { echo "test.sh: the SLURM cluster did not come up (required in CI)" >&2; exit 1; }
    export CURATION_SLURM_UNAVAILABLE="scripts/slurm.sh up failed (see its output above)"
    echo "test.sh: $CURATION_SLURM_UNAVAILABLE; the SLURM tests will be skipped" >&2
  fi
fi
# clip-retrieval's own client (the search service's compatibility test), without its heavy dependencies: its
# clip_client.py is loaded from this folder by file, unchanged (the package's __init__ would import flask).
CLIP_RETRIEVAL=.cache/clip-retrieval
if [ ! -f "$CLIP_RETRIEVAL/clip_retrieval/clip_client.py" ]; then
  UV=$(command -v uv || { for c in "$HOME/.local/bin/uv" .cache/uv-venv/bin/uv; do [ -x "$c" ] && echo "$c" && break; done; })
  "$UV" pip install --quiet --no-deps --target "$CLIP_RETRIEVAL" clip-retrieval==2.45.0
fi
# Train the sample web's models before pytest (once per machine: ~21 min on 2 cores, then cached), so no
# test's timeout has to cover it. The tests' default web has the same content on another port, hence the
# same cache entry. A subshell: the demo's settings (DAGSTER_HOME, CURATION_CLIP_SPEC) stay out of the tests.
if [ $full_suite = 1 ]; then
  (source scripts/common.sh && ensure_sample && ensure_sample_models)
fi
exec .venv/bin/python -m pytest "$@"
