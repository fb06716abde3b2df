#!/usr/bin/env bash
# make ui: the Dagster UI on http://127.0.0.1:3000 over the demo's lake and DAGSTER_HOME, with the
# sample web served so that materializations started from the UI can download, and the explorer
# (`curation serve`: search, provenance, export) on http://127.0.0.1:1234 over the same lake once it has an index.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
ensure_sample
ensure_sample_models
start_sample_server
mkdir -p "$DAGSTER_HOME"
[ -f "$DAGSTER_HOME/dagster.yaml" ] || printf 'telemetry:\n  enabled: false\n' > "$DAGSTER_HOME/dagster.yaml"
# One global lake writer at a time (assets.conventions.LAKE_WRITER_POOL), also in a home an older demo made.
grep -q '^concurrency:' "$DAGSTER_HOME/dagster.yaml" \
  || printf 'concurrency:\n  pools:\n    default_limit: 1\n' >> "$DAGSTER_HOME/dagster.yaml"
export CURATION_LAKE="$LAKE" CURATION_CRAWL_ROOT="$(pwd)/$SAMPLE" CURATION_ALLOW_LOOPBACK=1
EXPLORER="http://127.0.0.1:${SERVE_PORT:-1234}/"
if [ -f "$LAKE/index/image/manifest.json" ]; then
  # The toy CLIP encodes the queries; image_url queries may point at the sample web, hence --allow-loopback.
  "$BIN/curation" serve "$LAKE" --port "${SERVE_PORT:-1234}" --spec "$CLIP_SPEC" --allow-loopback \
    > "$DATA/explorer.log" 2>&1 &
  EXPLORER_PID=$!
  trap 'kill $SAMPLE_SERVER_PID $EXPLORER_PID 2>/dev/null || true' EXIT
  export CURATION_EXPLORER_URL="$EXPLORER"  # the index asset's metadata links to it
  echo "Explorer    on $EXPLORER (search the demo lake; log: $DATA/explorer.log)"
else
  echo "Explorer    not started: $LAKE has no index yet (make demo, or materialize index here, then make ui again)"
fi
echo "Dagster UI  on http://127.0.0.1:${UI_PORT:-3000} (Ctrl-C to stop both)"
"$BIN/dg" dev -w workspace.yaml -h 127.0.0.1 -p "${UI_PORT:-3000}"
