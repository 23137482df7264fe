#!/usr/bin/env bash
# One command from a fresh clone: set up, then run the whole test suite (unit + integration).
# Arguments go to pytest. Unless AUTOSPARSE_TEST_POSTGRES_URL is set (or AUTOSPARSE_TEST_POSTGRES=0),
# a throwaway PostgreSQL server (scripts/postgres.sh) runs for the shared-study test and is
# stopped when this script exits; without server binaries that test is skipped with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# torch's OpenMP threads spin while they wait: on a busy CI machine (or with several search
# processes on few cores) that makes training many times slower. Sleep instead.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

if [ -z "${AUTOSPARSE_TEST_POSTGRES_URL:-}" ] && [ "${AUTOSPARSE_TEST_POSTGRES:-1}" != 0 ]; then
  # A port and directory of this run's own, so that two test runs on one machine don't collide.
  AUTOSPARSE_PG_PORT=$(.venv/bin/python -c \
    'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  AUTOSPARSE_PG_DIR=$(mktemp -d /tmp/autosparse-pg-XXXXXX)
  export AUTOSPARSE_PG_PORT AUTOSPARSE_PG_DIR
  stop_postgres() { bash scripts/postgres.sh stop || true; rm -rf "$AUTOSPARSE_PG_DIR"; }
  trap stop_postgres EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  if pg_err=$(bash scripts/postgres.sh start 2>&1 >"$AUTOSPARSE_PG_DIR.url"); then
    AUTOSPARSE_TEST_POSTGRES_URL=$(cat "$AUTOSPARSE_PG_DIR.url")
    export AUTOSPARSE_TEST_POSTGRES_URL
  else
    export AUTOSPARSE_TEST_POSTGRES_SKIP_REASON="no PostgreSQL test server: ${pg_err:-scripts/postgres.sh start failed}"
  fi
  rm -f "$AUTOSPARSE_PG_DIR.url"
fi

# Headless Chromium for the browser test (scripts/chromium.sh; installed when missing only with
# AUTOSPARSE_INSTALL_CHROMIUM=1 as root); without it that test is skipped with the reason.
if [ -z "${AUTOSPARSE_CHROMIUM:-}" ] && [ "${AUTOSPARSE_TEST_CHROMIUM:-1}" != 0 ]; then
  if chromium_out=$(bash scripts/chromium.sh 2>/tmp/autosparse-chromium-$$.err); then
    export AUTOSPARSE_CHROMIUM="$chromium_out"
  else
    export AUTOSPARSE_CHROMIUM_SKIP_REASON="no headless Chromium: $(tail -n 1 /tmp/autosparse-chromium-$$.err)"
  fi
  rm -f /tmp/autosparse-chromium-$$.err
fi

# One pytest worker per CPU, at most 4 (pytest-xdist; AUTOSPARSE_TEST_WORKERS=N sets it, 1 runs
# one process): most tests use one thread, so on 2 cores the suite takes about half its serial
# time; the cap keeps a many-core machine from training dozens of dense models at once.
workers=${AUTOSPARSE_TEST_WORKERS:-$(.venv/bin/python -c 'import os
n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
print(max(1, min(4, n)))')}
if [ "$workers" = 1 ]; then
  .venv/bin/python -m pytest "$@"
else
  .venv/bin/python -m pytest -n "$workers" "$@"
fi
