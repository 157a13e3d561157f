#!/usr/bin/env bash
# Create (or reuse) a virtual environment with the project installed, on a CPU machine.
# torch is pinned to the CPU build first, so no requirement pulls a multi-GB CUDA build.
#   VENV=.venv TRANSFORMERS_VERSION=5.25.0 TORCH_VERSION=2.13.0 bash scripts/setup_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TRANSFORMERS_VERSION="${TRANSFORMERS_VERSION:-5.25.0}"
PY="${PYTHON:-python3}"
if [ ! -x "${VENV}/bin/python" ]; then
  "${PY}" -m venv "${VENV}"
fi
pip_q() {  # quiet install; on failure show pip's output and stop
  local log
  log="$(mktemp)"
  if ! "${VENV}/bin/python" -m pip install -q --disable-pip-version-check "$@" >"${log}" 2>&1; then
    cat "${log}"; rm -f "${log}"; echo "pip install $* failed" >&2; exit 1
  fi
  rm -f "${log}"
}
"${VENV}/bin/python" -c "import torch" 2>/dev/null || pip_q "torch==${TORCH_VERSION}"
pip_q "transformers==${TRANSFORMERS_VERSION}"
# keep torch and transformers where they are while the extras (trl, peft, ...) resolve
constraints="$(mktemp)"
"${VENV}/bin/python" -c "import torch; print('torch==' + torch.__version__)" >"${constraints}"
echo "transformers==${TRANSFORMERS_VERSION}" >>"${constraints}"
pip_q -e ".[dev]" -c "${constraints}"
# DeepSpeed (ZeRO-2/3 in tests/test_distributed.py) is published as source only and its build
# imports torch: built against this venv's torch (no build isolation, which would fetch another
# torch), with no compiled ops (they JIT-build where used; the CPU tests need none)
"${VENV}/bin/python" -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 pip_q --no-build-isolation "deepspeed==0.19.8" "setuptools>=70" wheel -c "${constraints}"
rm -f "${constraints}"
"${VENV}/bin/python" - <<'PY'
import torch, transformers, trl, peft, hf_varlen_patch
print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
      f"peft {peft.__version__}, hf_varlen_patch {hf_varlen_patch.__version__}")
PY
