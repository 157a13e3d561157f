#!/usr/bin/env bash
# The main job (README): set up the environment if needed, then scan every registered
# architecture on tiny embedded models, before and after apply().
#   bash scripts/scan.sh [--json scan.json] [model_type ...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}" bash scripts/setup_env.sh >/dev/null
"${VENV:-.venv}/bin/hf-varlen-patch" scan "$@"
