#!/usr/bin/env bash
# The test command (README, CI): set up the environment if needed, lint, run the tests.
#   bash scripts/test.sh [pytest args]        (TRANSFORMERS_VERSION=4.57.6 for the other CI leg)
# An existing $VENV (default .venv) keeps its transformers and torch unless TRANSFORMERS_VERSION
# or TORCH_VERSION asks for others (scripts/setup_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV="${VENV:-.venv}"
bash scripts/setup_env.sh
"${VENV}/bin/ruff" check hf_varlen_patch patches tests scripts
# two workers: CI machines have two cores (pytest-xdist; -p no:xdist to run in one process);
# unbuffered, so a redirected log shows progress as it happens
PYTHONUNBUFFERED=1 "${VENV}/bin/python" -m pytest -q -n "${PYTEST_WORKERS:-2}" "$@"
