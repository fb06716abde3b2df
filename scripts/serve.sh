#!/usr/bin/env bash
# make serve: the search service (`curation serve`, clip-retrieval's API) on http://127.0.0.1:1234 over the
# demo's lake, with the sample web's toy CLIP encoding text and image queries. Run `make demo` first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
if [ ! -f "$LAKE/index/image/manifest.json" ]; then
  echo "serve.sh: no index in $LAKE yet; run \`make demo\` first (it builds the lake and its index)" >&2
  exit 2
fi
ensure_sample
ensure_sample_models
start_sample_server  # image_url queries may point at the sample web, hence --allow-loopback below
echo "search service on http://127.0.0.1:${SERVE_PORT:-1234} (Ctrl-C to stop)"
"$BIN/curation" serve "$LAKE" --port "${SERVE_PORT:-1234}" --spec "$CLIP_SPEC" --allow-loopback
