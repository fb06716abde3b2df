#!/usr/bin/env bash
# make ui: the Dagster UI on http://127.0.0.1:3000 over the demo's lake and DAGSTER_HOME, with the
# sample web served so that materializations started from the UI can download.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
ensure_sample
ensure_sample_models
start_sample_server
mkdir -p "$DAGSTER_HOME"
[ -f "$DAGSTER_HOME/dagster.yaml" ] || printf 'telemetry:\n  enabled: false\n' > "$DAGSTER_HOME/dagster.yaml"
export CURATION_LAKE="$LAKE" CURATION_CRAWL_ROOT="$(pwd)/$SAMPLE" CURATION_ALLOW_LOOPBACK=1
echo "Dagster UI on http://127.0.0.1:3000 (Ctrl-C to stop)"
"$BIN/dg" dev -w workspace.yaml -h 127.0.0.1 -p "${UI_PORT:-3000}"
