#!/usr/bin/env bash
# The test command (README, CI): set up the environment if needed, lint, run the tests.
#   bash scripts/test.sh [pytest args]        (TRANSFORMERS_VERSION=4.57.6 for the other CI leg)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}" bash scripts/setup_env.sh
VENV="${VENV:-.venv}"
"${VENV}/bin/ruff" check hf_varlen_patch patches tests scripts
# two workers: CI machines have two cores (pytest-xdist; -p no:xdist to run in one process)
"${VENV}/bin/python" -m pytest -q -n "${PYTEST_WORKERS:-2}" "$@"
