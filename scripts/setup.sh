#!/usr/bin/env bash
# Create .venv (once) and install autosparse with its test and docs extras into it.
# torch is pinned to 2.13 in pyproject.toml: pip takes the local CPU build instead of a CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.autosparse-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[test,docs]"
  touch "$stamp"
fi
