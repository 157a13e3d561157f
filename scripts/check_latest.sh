#!/usr/bin/env bash
# Assess the newest transformers release in one command (not in CI): a scratch environment with
# `pip install -U transformers`, then `scan --all` over every causal LM it ships.
#   bash scripts/check_latest.sh [--json latest.json]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-latest}"
[ -x "${VENV}/bin/python" ] || python3 -m venv "${VENV}"
"${VENV}/bin/python" -c "import torch" 2>/dev/null || "${VENV}/bin/pip" install -q "torch==${TORCH_VERSION:-2.13.0}"
"${VENV}/bin/pip" install -q -U transformers
"${VENV}/bin/pip" install -q -e ".[test]"
"${VENV}/bin/python" -c "import transformers; print('transformers', transformers.__version__)"
"${VENV}/bin/hf-varlen-patch" scan --all "$@"
