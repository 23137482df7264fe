#!/usr/bin/env bash
# One command from a fresh clone: set up, then run the built-in default search.
# Results go to runs/ (study, pareto.csv, MLflow store); browse them with `.venv/bin/autosparse ui`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/autosparse search "${1:-search_spaces/quickstart.yaml}" "${@:2}"
