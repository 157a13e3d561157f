#!/usr/bin/env bash
# The GPU evidence for the closing notes: installs the project (no dependencies: the device
# image has torch and transformers) and runs the tests marked `gpu`, printing bf16 errors
# next to bf16's own noise. Usage (from the repository root, on a CUDA machine):
#   bash scripts/gpu_checks.sh            # log also saved to $OUT/gpu_tests.log if OUT is set
#   bash scripts/gpu_checks.sh -k multimodal   # extra arguments go to pytest
set -euo pipefail
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
python3 - <<'PY'
import torch, transformers
print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; transformers {transformers.__version__}")
PY
python3 -m pytest tests/test_gpu.py -m gpu -v -s -p no:cacheprovider -o addopts="" "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_tests.log"
