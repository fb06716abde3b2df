#!/usr/bin/env bash
# System (Debian) packages the tests need beyond .venv, by group: `scripts/system-deps.sh chromium [GROUP…]`.
# Idempotent: installs only what is missing (apt-get, as root); not root and something missing: says what
# to run and exits 1. Add a group with one line in PACKAGE_GROUPS.
set -euo pipefail

declare -A PACKAGE_GROUPS=(
  # Headless Chromium for the UI test (tests/test_ui). fonts-liberation is Chromium's recommended font
  # set (Arial/Times metrics); the other recommends (udev, upower, mesa) are not needed headless.
  [chromium]="chromium fonts-liberation"
)

if [ "$#" -eq 0 ]; then
  echo "usage: $0 GROUP... (groups: ${!PACKAGE_GROUPS[*]})" >&2
  exit 2
fi

wanted=()
for group in "$@"; do
  if [ -z "${PACKAGE_GROUPS[$group]+set}" ]; then
    echo "$0: unknown group '$group' (groups: ${!PACKAGE_GROUPS[*]})" >&2
    exit 2
  fi
  read -ra pkgs <<< "${PACKAGE_GROUPS[$group]}"
  wanted+=("${pkgs[@]}")
done

if ! command -v dpkg-query >/dev/null; then
  echo "$0: not a Debian system, cannot check; make sure these are installed: ${wanted[*]}" >&2
  exit 0
fi

missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ "${#missing[@]}" -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "$0: missing system packages: ${missing[*]}" >&2
  echo "install them as root: sudo $0 $*   (or: sudo apt-get install ${missing[*]})" >&2
  exit 1
fi

echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Other jobs on the machine may hold the dpkg lock for a while: wait for it rather than fail.
apt-get -o DPkg::Lock::Timeout=300 update -qq
apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
