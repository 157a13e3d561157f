#!/usr/bin/env bash
# The main job (README): set up the environment if needed, then scan every registered
# architecture on tiny embedded models, before and after apply().
#   bash scripts/scan.sh [--json scan.json] [model_type ...]
# An existing $VENV (default .venv) keeps its transformers and torch unless TRANSFORMERS_VERSION
# or TORCH_VERSION asks for others (scripts/setup_env.sh). The set-up reports on stderr as it goes,
# so stdout carries the scan alone; the scan runs unbuffered, so a redirected file gets each line
# when it is printed.
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV="${VENV:-.venv}"
bash scripts/setup_env.sh >&2
PYTHONUNBUFFERED=1 "${VENV}/bin/hf-varlen-patch" scan "$@"
