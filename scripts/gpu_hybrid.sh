#!/usr/bin/env bash
# GPU evidence for the hybrid issue on a CUDA machine without network, in stages (logs under $OUT):
#   build       start building causal-conv1d for sm_90 from its sdist, in the background
#   torch       the hybrid types' bf16 GPU tests on the exact torch paths (no recurrent kernels)
#   fla         install flash-linear-attention from wheels; its bf16 kernel test for qwen3_next
#   bench       padded vs packed on a ~0.5B Qwen3.5-style hybrid (torch paths; `bench-fla`: with fla)
#   kernels     install what `build` built and run the recurrent-kernel tests with it
# Usage: bash scripts/gpu_hybrid.sh build torch fla bench     (wheels/sdists in $W, default .whl/hybrid)
# Triton compiles fla's kernels on first use (minutes on tiny shapes: autotuning), so keep stages few.
set -uo pipefail
W="${W:-.whl/hybrid}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT" /tmp/built
TYPES="bamba or falcon_h1 or falcon_mamba or granitemoehybrid or jamba or kimi_linear or bailing_hybrid or lara_mini or lfm2 or lfm3 or mamba or mamba2 or nemotron_h or olmo_hybrid or qwen3_5_text or qwen3_5_moe_text or qwen3_next or zamba or zamba2"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
python3 -c "import torch, transformers; print(torch.cuda.get_device_name(0), torch.__version__, transformers.__version__)"
pytest_gpu() { python3 -m pytest tests/test_gpu.py -m gpu -v -s -p no:cacheprovider -o addopts="" "$@"; }
fla_site() { [ -d /tmp/site/fla ] || python3 -m pip install -q --no-deps --target /tmp/site "$W"/einops-*.whl "$W"/fla_core-*.whl "$W"/flash_linear_attention-*.whl; }

for stage in "$@"; do
  echo "== $stage ($(date +%T))"
  case "$stage" in
    build)
      ( start=$(date +%s); root=$PWD
        mkdir -p /tmp/src && cd /tmp/src && tar xzf "$root/$W"/causal_conv1d-*.tar.gz && cd causal_conv1d-*/ &&
          CAUSAL_CONV1D_FORCE_BUILD=TRUE TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=14 \
            python3 -m pip wheel -q --no-deps --no-build-isolation -w /tmp/built . > /tmp/build_conv.log 2>&1
        echo "causal-conv1d build: rc=$? after $(( $(date +%s) - start )) s" >> /tmp/build_conv.log ) &
      ;;
    torch)
      pytest_gpu -k "$TYPES" > "$OUT/gpu_hybrid_torch.log" 2>&1
      grep -E "passed|failed" "$OUT/gpu_hybrid_torch.log" | tail -1 ;;
    fla)
      fla_site
      PYTHONPATH=/tmp/site timeout "${FLA_TIMEOUT:-400}" python3 -m pytest tests/test_gpu.py -m gpu -v -s -p no:cacheprovider \
        -o addopts="" -k "${FLA_K:-recurrent_kernels and (qwen3_next or kimi_linear)}" > "$OUT/gpu_hybrid_fla.log" 2>&1
      grep -E "passed|failed|FAILED|relative error" "$OUT/gpu_hybrid_fla.log" | tail -6 ;;
    bench)
      python3 scripts/bench_hybrid.py --out "$OUT" --dists "${DISTS:-flan,orcamath}" --steps 8 --warmup 2 2>&1 | tail -4 ;;
    bench-fla)
      fla_site; PYTHONPATH=/tmp/site python3 scripts/bench_hybrid.py --out "$OUT" --steps 8 --warmup 3 2>&1 | tail -4 ;;
    kernels)
      for w in /tmp/built/*.whl; do [ -e "$w" ] && python3 -m pip install -q --no-deps --target /tmp/site "$w"; done
      PYTHONPATH=/tmp/site pytest_gpu -k "recurrent_kernels and (lfm2 or bamba or jamba)" > "$OUT/gpu_hybrid_conv.log" 2>&1
      grep -E "passed|failed|FAILED|relative error" "$OUT/gpu_hybrid_conv.log" | tail -8 ;;
  esac
done
tail -2 /tmp/build_conv.log 2>/dev/null; ls /tmp/built; cp /tmp/build_conv.log "$OUT/" 2>/dev/null; true
