#!/usr/bin/env bash
# GPU evidence for the hybrid issue, in one call on a CUDA machine without network:
#   1. starts building causal-conv1d (and mamba-ssm) for sm_90 from their sdists in the background;
#   2. runs the hybrid types' bf16 GPU tests with the exact torch paths (no recurrent kernels);
#   3. installs flash-linear-attention from wheels and runs them again through its kernels;
#   4. benchmarks padded vs packed on a ~0.5B Qwen3.5-style hybrid, with and without fla.
# Usage: bash scripts/gpu_hybrid.sh [wheel dir, default .whl/hybrid]   (logs under $OUT)
#        bash scripts/gpu_hybrid.sh --kernels-only   # a later call: install the built wheels, test them
set -uo pipefail
W="${1:-.whl/hybrid}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT" /tmp/built
TYPES="bamba or falcon_h1 or falcon_mamba or granitemoehybrid or jamba or kimi_linear or bailing_hybrid or lara_mini or lfm2 or lfm3 or mamba or mamba2 or nemotron_h or olmo_hybrid or qwen3_5_text or qwen3_5_moe_text or qwen3_next or zamba or zamba2"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
python3 -c "import torch, transformers; print(torch.cuda.get_device_name(0), torch.__version__, transformers.__version__)"
pytest_gpu() { python3 -m pytest tests/test_gpu.py -m gpu -v -s -p no:cacheprovider -o addopts="" "$@"; }

if [ "${1:-}" = "--kernels-only" ]; then
  for w in /tmp/built/*.whl; do [ -e "$w" ] && python3 -m pip install -q --no-deps --target /tmp/site "$w"; done
  ls /tmp/built; tail -3 /tmp/build_*.log
  PYTHONPATH=/tmp/site pytest_gpu -k "recurrent_kernels" 2>&1 | tee "$OUT/gpu_kernels_built.log" | tail -40
  exit 0
fi

# 1. background builds (nvcc; no network: force the source build)
(
  start=$(date +%s)
  mkdir -p /tmp/src && cd /tmp/src && tar xzf "$OLDPWD/$W"/causal_conv1d-*.tar.gz && cd causal_conv1d-*/ &&
    CAUSAL_CONV1D_FORCE_BUILD=TRUE TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=12 \
      python3 -m pip wheel -q --no-deps --no-build-isolation -w /tmp/built . > /tmp/build_conv.log 2>&1
  echo "causal-conv1d build: rc=$? after $(( $(date +%s) - start )) s" >> /tmp/build_conv.log
) &
python3 -m pip install -q --no-deps --target /tmp/site "$W"/einops-*.whl "$W"/fla_core-*.whl "$W"/flash_linear_attention-*.whl

# 2. torch paths
pytest_gpu -k "$TYPES" > "$OUT/gpu_hybrid_torch.log" 2>&1
grep -E "passed|failed" "$OUT/gpu_hybrid_torch.log" | tail -2
grep -E "FAILED|relative error" "$OUT/gpu_hybrid_torch.log" | grep -E "FAILED|bamba/|qwen3_next/|lfm2/|jamba/|falcon_h1/" | head -20

# 3. flash-linear-attention kernels
PYTHONPATH=/tmp/site pytest_gpu -k "recurrent_kernels or qwen3_next or qwen3_5_text or olmo_hybrid or kimi_linear" > "$OUT/gpu_hybrid_fla.log" 2>&1
grep -E "passed|failed" "$OUT/gpu_hybrid_fla.log" | tail -2
grep -E "FAILED|SKIPPED|relative error" "$OUT/gpu_hybrid_fla.log" | head -20

# 4. padded vs packed tokens/s
python3 scripts/bench_hybrid.py --out "$OUT" --steps 8 --warmup 2 2>&1 | tail -5
PYTHONPATH=/tmp/site python3 scripts/bench_hybrid.py --out "$OUT" --steps 8 --warmup 2 2>&1 | tail -5
cat "$OUT"/hybrid_padding_vs_packing_*.md
cp /tmp/build_*.log "$OUT/" 2>/dev/null; tail -2 /tmp/build_conv.log; ls /tmp/built
