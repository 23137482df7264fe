#!/usr/bin/env bash
# Headless Chromium for the browser test (tests/tracking/test_browser.py): print its path.
#
# Found: $AUTOSPARSE_CHROMIUM, else chromium / chromium-browser / google-chrome on PATH.
# Missing: as root with AUTOSPARSE_INSTALL_CHROMIUM=1 (what .ci/run sets), Debian's `chromium`
# package is installed with apt-get; otherwise exit 3 with the reason on stderr (the test is
# then skipped with it). Only the path goes to stdout.
set -euo pipefail

die() { echo "scripts/chromium.sh: $*" >&2; exit "${EXIT_CODE:-1}"; }

find_chromium() {
  if [ -n "${AUTOSPARSE_CHROMIUM:-}" ]; then
    command -v "$AUTOSPARSE_CHROMIUM" 2>/dev/null && return 0
    return 1
  fi
  local name
  for name in chromium chromium-browser google-chrome google-chrome-stable; do
    command -v "$name" 2>/dev/null && return 0
  done
  return 1
}

if path=$(find_chromium); then
  echo "$path"
  exit 0
fi
if [ "$(id -u)" = 0 ] && [ "${AUTOSPARSE_INSTALL_CHROMIUM:-0}" = 1 ] && command -v apt-get >/dev/null; then
  echo "scripts/chromium.sh: installing Chromium (apt-get install chromium)" >&2
  log=$(mktemp /tmp/autosparse-apt-XXXXXX.log)
  if apt-get update -qq >"$log" 2>&1 \
     && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
        >>"$log" 2>&1; then
    rm -f "$log"
  else
    tail -n 20 "$log" >&2
    rm -f "$log"
    EXIT_CODE=3 die "installing chromium with apt-get failed"
  fi
  path=$(find_chromium) || EXIT_CODE=3 die "chromium installed, but not found on PATH"
  echo "$path"
  exit 0
fi
EXIT_CODE=3 die "no chromium on PATH; install it (Debian: apt-get install chromium) or run as root with AUTOSPARSE_INSTALL_CHROMIUM=1"
