#!/usr/bin/env bash
# make test: install what the tests need (beyond .venv) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
scripts/system-deps.sh chromium
exec .venv/bin/python -m pytest "$@"
