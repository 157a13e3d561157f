#!/usr/bin/env bash
# Assess the newest transformers release in one command (not in CI): a scratch environment with
# `pip install -U transformers`, then `scan --all` over every causal-LM and image-text-to-text type
# it ships, and the hybrid/recurrent tests (the routers read upstream's recurrent functions, whose
# signatures and wrappers change between releases). Fails if either fails.
#   bash scripts/check_latest.sh [--json latest.json]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv-latest}"
[ -x "${VENV}/bin/python" ] || python3 -m venv "${VENV}"
"${VENV}/bin/python" -c "import torch" 2>/dev/null || "${VENV}/bin/pip" install -q "torch==${TORCH_VERSION:-2.13.0}"
"${VENV}/bin/pip" install -q -U transformers
"${VENV}/bin/pip" install -q -e ".[test]"
"${VENV}/bin/python" -c "import transformers; print('transformers', transformers.__version__)"
status=0
"${VENV}/bin/hf-varlen-patch" scan --all "$@" || status=1
"${VENV}/bin/python" -m pytest -q -n "${PYTEST_WORKERS:-2}" tests/test_hybrid.py tests/test_recurrent.py || status=1
exit ${status}
