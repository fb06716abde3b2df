# Paths and settings shared by the make targets' scripts (sourced, not run).
DATA="${DATA:-.data}"
SAMPLE="${SAMPLE:-$DATA/sample-web}"
LAKE="${LAKE:-$(pwd)/$DATA/lake}"
PORT="${PORT:-8642}"
BIN=.venv/bin
export DAGSTER_HOME="${DAGSTER_HOME:-$(pwd)/.dagster_home}"
export HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1

# Generate the sample web unless one for this port already exists.
ensure_sample() {
  if [ ! -f "$SAMPLE/manifest.json" ] || ! grep -q "\"port\": $PORT," "$SAMPLE/manifest.json"; then
    rm -rf "$SAMPLE"
    "$BIN/curation" sample-web "$SAMPLE" --port "$PORT"
  fi
}

# Train (once per machine; cached in ~/.cache/curation/models) the sample web's toy CLIP and heads, and
# write their models spec where the clip asset reads it.
CLIP_SPEC="${CLIP_SPEC:-$(pwd)/$DATA/models/sample-models.json}"
ensure_sample_models() {
  mkdir -p "$(dirname "$CLIP_SPEC")"
  "$BIN/curation" train-toy-clip "$SAMPLE" --spec-out "$CLIP_SPEC" > "$DATA/models/train.log"
  export CURATION_CLIP_SPEC="$CLIP_SPEC"
}

# Serve the sample web in the background until this shell exits.
start_sample_server() {
  mkdir -p "$DATA"
  "$BIN/curation" serve-sample-web "$SAMPLE" > "$DATA/sample-web.log" 2>&1 &
  SAMPLE_SERVER_PID=$!
  trap 'kill $SAMPLE_SERVER_PID 2>/dev/null || true' EXIT
  for _ in $(seq 1 100); do
    if "$BIN/python" -c "import socket,sys; s=socket.socket(); s.settimeout(0.2); sys.exit(s.connect_ex(('127.0.0.1', $PORT)))"; then
      return 0
    fi
    kill -0 "$SAMPLE_SERVER_PID" 2>/dev/null || { cat "$DATA/sample-web.log" >&2; return 1; }
    sleep 0.2
  done
  echo "the sample web server did not start; see $DATA/sample-web.log" >&2
  return 1
}
