#!/usr/bin/env bash
# Install uv if it is missing, then build .venv from uv.lock (CPU faiss unless CURATION_EXTRA=gpu).
# Works on a fresh Debian 12 that has only python3: falls back to pip --user, a bootstrap venv, or
# (as root) Debian's python3-pip/python3-venv.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA="${CURATION_EXTRA:-cpu}"
PY="$(command -v python3.11 || command -v python3.12 || command -v python3 || true)"
[ -n "$PY" ] || { echo "bootstrap: python3 (3.11 or 3.12) is required" >&2; exit 1; }

find_uv() {
  command -v uv && return 0
  for c in "$HOME/.local/bin/uv" .cache/uv-venv/bin/uv; do [ -x "$c" ] && { echo "$c"; return 0; }; done
  return 1
}

UV="$(find_uv || true)"
if [ -z "$UV" ]; then
  echo "bootstrap: installing uv"
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --user --break-system-packages uv 2>/dev/null \
      || "$PY" -m pip install --quiet --user uv || true
  fi
  if ! find_uv >/dev/null; then
    if ! "$PY" -m venv .cache/uv-venv >/dev/null 2>&1; then
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip
        "$PY" -m venv .cache/uv-venv
      else
        echo "bootstrap: cannot install uv (no pip, no venv); install uv and retry" >&2; exit 1
      fi
    fi
    .cache/uv-venv/bin/pip install --quiet uv
  fi
  UV="$(find_uv)"
fi

export UV_PYTHON_DOWNLOADS=never
"$UV" sync --frozen --extra "$EXTRA" --python "$PY"
