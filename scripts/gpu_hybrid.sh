#!/usr/bin/env bash
# GPU evidence for the hybrid issues on a CUDA machine without network, in stages (logs under $OUT):
#   stash       copy the Triton parts this call carries (.whl/triton_parts/part*) to /tmp/parts: parts
#               of a Triton tarball may travel over consecutive calls (64 MiB each) on a warm machine
#   triton      join /tmp/parts, check its sha256, unpack Triton >= 3.7.1 into /tmp/site (fla's gated
#               backward on Hopper needs it; the machine's torch 2.11 ships 3.6) and import it with torch.
#               The tarball: the cp312 wheel unpacked, libtriton.so stripped (--strip-unneeded), the
#               profiler (proton, cupti), cuobjdump/nvdisasm and ptxas-blackwell left out, tar | xz -9:
#               48.5 MB, one part (the wheel is 198 MB)
#   fla         install flash-linear-attention (+ fla-core, einops) from wheels into /tmp/site, and
#               scripts/triton_first_config.py as /tmp/site/sitecustomize.py: with TRITON_CONFIGS=first
#               (the default here) every Triton autotuner runs the first configuration that fits instead of timing
#               them all (compiling each of fla's 4-16 configurations per kernel outlasts the device time)
#   mamba       mamba_ssm's Triton SSD kernels from its sdist into /tmp/site, without the package
#               __init__ (it imports the CUDA selective scan) and, while causal-conv1d is missing,
#               without mamba_split_conv1d_scan_combined (it needs causal-conv1d's CUDA functions)
#   check       scripts/gpu_kernel_check.py: each kernel packed vs each sequence alone at 1..4000 tokens
#   recurrent   the bf16 recurrent-kernel tests (HF_VARLEN_RECURRENT_KERNELS=all), RK_K selects types
#   torch       the hybrid types' bf16 GPU tests on the exact torch paths (no recurrent kernels)
#   bench       padded vs packed on ~0.5B hybrids (MODELS, default "qwen3_5 bamba"): (a) padded upstream
#               (with what it finds installed), (b) packed + torch ops, (c) packed + kernels; BENCH_ARGS
#               adds options (e.g. "--profile 12": each row's top kernels and GPU idle gaps, traces in $OUT)
#   compile     a packed hybrid step under torch.compile, bf16: graphs, breaks and compiles over 20 batches
#               of new lengths (scripts/compile_check.py). First, where fla is staged, with the verified
#               kernels under aot_eager (the scan kernels are graph breaks); then the exact torch ops under
#               inductor, on the machine's own Triton (inductor's), so /tmp/site is left off PYTHONPATH;
#               COMPILE_KERNELS=0 runs only the latter; COMPILE_BACKEND picks the attention backend (torch)
#   build       start building causal-conv1d for sm_90 from its sdist, in the background
#   conv        install what `build` built and run the recurrent-kernel tests with it
# Usage: bash scripts/gpu_hybrid.sh stash triton fla mamba check recurrent bench
#        (carry .whl/triton_parts and .whl/hybrid; with several parts, `stash` in each call first)
# Wheels/sdists in $W (default .whl/hybrid), made with the Triton parts by scripts/stage_hybrid_wheels.sh
# (run it once where PyPI is reachable); everything installed goes to /tmp/site (PYTHONPATH).
set -uo pipefail
W="${W:-.whl/hybrid}"
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT" /tmp/built /tmp/parts /tmp/site
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_CONFIGS="${TRITON_CONFIGS:-first}"
TYPES="bamba or falcon_h1 or falcon_mamba or granitemoehybrid or jamba or kimi_linear or bailing_hybrid or lara_mini or lfm2 or lfm3 or mamba or mamba2 or nemotron_h or olmo_hybrid or qwen3_5_text or qwen3_5_moe_text or qwen3_next or zamba or zamba2"
installed() { python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; }
pytest_gpu() { python3 -m pytest tests/test_gpu.py -m gpu -v -s -p no:cacheprovider -o addopts="" "$@"; }

for stage in "$@"; do
  echo "== $stage ($(date +%T))"
  case "$stage" in
    stash)
      cp -v .whl/triton_parts/part* .whl/triton_parts/sha256 /tmp/parts/ 2>/dev/null; ls -la /tmp/parts ;;
    triton)
      [ -e /tmp/site/triton/__init__.py ] && echo "already unpacked" ||
      ( cd /tmp/parts && cat part* > /tmp/triton.tar.xz && sha256sum /tmp/triton.tar.xz &&
        [ "$(sha256sum /tmp/triton.tar.xz | cut -d' ' -f1)" = "$(cut -d' ' -f1 sha256)" ] &&
        python3 -c "import tarfile; tarfile.open('/tmp/triton.tar.xz').extractall('/tmp/site')" ) || echo "TRITON PARTS BROKEN"
      chmod +x /tmp/site/triton/backends/nvidia/bin/*  # a tarball from zipfile may lack them (ptxas: EACCES)
      python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, triton.__file__, torch.cuda.get_device_name(0))" ;;
    fla)
      python3 -c "import sitecustomize; print('machine sitecustomize:', sitecustomize.__file__)" 2>/dev/null
      cp scripts/triton_first_config.py /tmp/site/sitecustomize.py
      python3 -m pip install -q --no-deps --no-compile --target /tmp/site "$W"/einops-*.whl "$W"/fla_core-*.whl \
        "$W"/flash_linear_attention-*.whl 2>&1 | grep -v "already exists" | tail -2
      python3 -c "import fla, triton, triton.runtime.autotuner as a; print('fla', fla.__version__, 'triton', triton.__version__, 'autotune:', a.Autotuner._bench.__name__)" ;;
    mamba)
      mkdir -p /tmp/src && tar xzf "$W"/mamba_ssm-*.tar.gz -C /tmp/src && rm -rf /tmp/site/mamba_ssm &&
        cp -r /tmp/src/mamba_ssm-*/mamba_ssm /tmp/site/ &&
        echo "__version__ = \"$(ls "$W"/mamba_ssm-*.tar.gz | sed 's/.*mamba_ssm-\(.*\)\.tar\.gz/\1/')\"" > /tmp/site/mamba_ssm/__init__.py
      python3 -c "import causal_conv1d" 2>/dev/null || cat >> /tmp/site/mamba_ssm/ops/triton/ssd_combined.py <<'EOF'

# hf_varlen_patch's GPU staging (scripts/gpu_hybrid.sh): causal-conv1d is not installed here, so the
# fused split-conv1d-scan cannot run; without it transformers and the routers take the unfused path.
if causal_conv1d_fwd_function is None:
    del mamba_split_conv1d_scan_combined
EOF
      python3 -c "from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as f; print('mamba_ssm SSD', f.__module__)" ;;
    check)
      installed
      timeout "${CHECK_TIMEOUT:-360}" python3 scripts/gpu_kernel_check.py --only "${CHECK_ONLY:-gdn,conv,kda,ssd}" \
        --out "$OUT/recurrent_kernel_check.json" 2>&1 | tee "$OUT/recurrent_kernel_check.log" | grep -vE "Warning|warn" ;;
    recurrent)
      installed
      timeout "${RK_TIMEOUT:-400}" python3 -m pytest tests/test_gpu.py -m gpu -v -s -p no:cacheprovider -o addopts="" \
        -k "recurrent_kernels and (${RK_K:-qwen3_next or kimi_linear or lfm2 or bamba})" > "$OUT/gpu_recurrent_kernels.log" 2>&1
      grep -E "PASSED|FAILED|SKIPPED|ERROR|relative error|kernel calls|passed|failed" "$OUT/gpu_recurrent_kernels.log" | tail -40 ;;
    torch)
      installed
      pytest_gpu -k "$TYPES" > "$OUT/gpu_hybrid_torch.log" 2>&1
      grep -E "passed|failed" "$OUT/gpu_hybrid_torch.log" | tail -1 ;;
    bench)
      installed
      for model in ${MODELS:-qwen3_5 bamba}; do
        timeout "${BENCH_TIMEOUT:-270}" python3 scripts/bench_hybrid.py --model "$model" --out "$OUT" \
          --dists "${DISTS:-flan,orcamath}" --modes padded,packed --backends "${BACKENDS:-torch+ops,torch+kernels}" \
          --steps "${STEPS:-8}" --warmup "${WARMUP:-3}" ${BENCH_ARGS:-} 2>&1 | grep -vE "Warning|warn" | tee "$OUT/bench_$model.log" | tail -9
      done ;;
    compile)
      installed
      # the verified kernels as auto takes them, under aot_eager (the scan kernels are graph breaks;
      # inductor would build for the machine's Triton, not the staged one)
      [ -e /tmp/site/fla ] && [ "${COMPILE_KERNELS:-1}" = 1 ] && timeout "${COMPILE_TIMEOUT:-300}" python3 scripts/compile_check.py \
        --types "${COMPILE_TYPES:-qwen3_5_text,bamba,lfm2,qwen3_next}" --device cuda --dtype bfloat16 --backend "${COMPILE_BACKEND:-torch}" \
        --compiler aot_eager --batches 20 2>&1 | grep -vE "Warning|warn|^\[transformers\]" | tee "$OUT/compile_hybrid_gpu_kernels.log" | tail -12
      # the exact torch ops under inductor, on the machine's own Triton; torch 2.11's coalesce tiling
      # analysis asserts on these dynamic shapes (pytorch#181563, fixed in 2.13): off unless set
      PYTHONPATH= HF_VARLEN_RECURRENT_KERNELS=0 TORCHINDUCTOR_COALESCE_TILING_ANALYSIS="${TORCHINDUCTOR_COALESCE_TILING_ANALYSIS:-0}" timeout "${COMPILE_TIMEOUT:-300}" python3 scripts/compile_check.py \
        --types "${COMPILE_TYPES:-qwen3_5_text,bamba,lfm2,qwen3_next}" --device cuda --dtype bfloat16 --backend "${COMPILE_BACKEND:-torch}" \
        --compiler inductor --batches 20 2>&1 | grep -vE "Warning|warn|^\[transformers\]" | tee "$OUT/compile_hybrid_gpu.log" | tail -12 ;;
    build)
      ( start=$(date +%s); root=$PWD
        mkdir -p /tmp/src && cd /tmp/src && tar xzf "$root/$W"/causal_conv1d-*.tar.gz && cd causal_conv1d-*/ &&
          CAUSAL_CONV1D_FORCE_BUILD=TRUE TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=14 \
            python3 -m pip wheel -q --no-deps --no-build-isolation -w /tmp/built . > /tmp/build_conv.log 2>&1
        echo "causal-conv1d build: rc=$? after $(( $(date +%s) - start )) s" >> /tmp/build_conv.log ) &
      ;;
    conv)
      for w in /tmp/built/*.whl; do [ -e "$w" ] && python3 -m pip install -q --no-deps --target /tmp/site "$w"; done
      pytest_gpu -k "recurrent_kernels and (lfm2 or bamba or jamba)" > "$OUT/gpu_hybrid_conv.log" 2>&1
      grep -E "passed|failed|FAILED|relative error" "$OUT/gpu_hybrid_conv.log" | tail -8 ;;
  esac
done
tail -2 /tmp/build_conv.log 2>/dev/null; cp /tmp/build_conv.log "$OUT/" 2>/dev/null; true
