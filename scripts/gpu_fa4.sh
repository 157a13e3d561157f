#!/usr/bin/env bash
# flash-attn on the GPU machine (no network there), in stages; results under $OUT.
#
# FlashAttention-4 (flash-attn-4 4.0.0b36, module flash_attn.cute): the wheels (pip download
# --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 ...) are
# more than one call may carry, so:
#   here:   bash scripts/gpu_fa4.sh split      cut the 92 MB libs-cu13 wheel into .whl/fa4/part1 and part2
#   call 1: bash scripts/gpu_fa4.sh stash      (carry .whl/fa4/part1) copies part 1 to /tmp/fa4
#   call 2: bash scripts/gpu_fa4.sh install tests compile   (carry .whl/fa4/part2, within 30 s of call 1)
#   call 3: bash scripts/gpu_fa4.sh bench-gpt2 bench-llama  (the machine still warm: /tmp/site stays)
#   bench-kernels  the eager and compiled packed rows and the oracle, GPU time by kernel family side by side,
#                  each row's trace (trace_*.json.gz) and its idle gaps by launching op (scripts/trace_gaps.py)
# FA2 (flash-attn 2.8.3, source only: .whl/fa2/flash_attn-2.8.3.tar.gz from PyPI's files host):
#   fa2-build   build it for sm_90 in the foreground (FLASH_ATTN_CUDA_ARCHS=90, MAX_JOBS, at most
#               FA2_TIMEOUT s), trimmed by scripts/fa2_trim.py to bf16 at head dims FA2_HEAD_DIMS (default
#               64,128: 13 objects instead of 73) unless FA2_FULL=1. A job left running in the background
#               dies when its call ends, so the build runs inside the call; a build cut short resumes
#               from the objects already built when the next call (machine still warm) runs fa2-build again.
#               Measured on the H200: the trimmed build's 13 objects took 419 s + 328 s (the first 12
#               sharing the CPUs with the FA4 tests, the last alone); the full one, 22 of 73 in 641 s.
#   fa2-tests   install the wheel into /tmp/site_fa2 and run the flash GPU tests with FA2 alone
#   fa2-bench   the GPT-2 flash rows, upstream's flash_attention_2 row and the oracle on FA2, with the kernel breakdown
#   one FA2 pass: call 1 `stash` (carry part1); call 2 `install fa2-build` (carry part2 and .whl/fa2,
#   about 8 min); call 3 `fa2-tests fa2-bench`; the FA4 stages after that still find /tmp/site
set -euo pipefail
W="${W:-.whl/fa4}"
SITE=/tmp/site
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
FA4_PATH="$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages"
with_fa4() { PYTHONPATH="$FA4_PATH${PYTHONPATH:+:$PYTHONPATH}" "$@"; }
# at most 8 files of 16 MiB come back from $OUT: a bench's row traces travel as one archive,
# the largest left out until it fits
pack_traces() {
  local dir="$OUT/$1"
  ls "$dir"/trace_*.json.gz >/dev/null 2>&1 || return 0
  while :; do
    tar cf "$OUT/$1_traces.tar" -C "$dir" $(cd "$dir" && ls trace_*.json.gz)
    [ "$(stat -c %s "$OUT/$1_traces.tar")" -le 16000000 ] && break
    rm -f "$(ls -S "$dir"/trace_*.json.gz | head -1)"
    ls "$dir"/trace_*.json.gz >/dev/null 2>&1 || { rm -f "$OUT/$1_traces.tar"; break; }
  done
  rm -f "$dir"/trace_*.json.gz; ls -la "$OUT" "$dir"
}
install_self() { python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1; }
for stage in "$@"; do
  echo "== $stage ($(date +%T))"
  case "$stage" in
    split)
      mkdir -p "$W/part1" "$W/part2"
      big=$(ls "$W"/nvidia_cutlass_dsl_libs_cu13-*.whl)
      split -n 2 -d "$big" "$W/part1/$(basename "$big").part"
      mv "$W/part1/$(basename "$big").part01" "$W/part2/"
      for w in "$W"/*.whl; do case "$w" in *libs_cu13*) ;; *cuda_bindings*) cp "$w" "$W/part2/" ;; *) cp "$w" "$W/part1/" ;; esac; done
      du -sh "$W/part1" "$W/part2" ;;
    stash)
      mkdir -p /tmp/fa4 && cp "$W"/part1/* /tmp/fa4/ && ls /tmp/fa4 | wc -l
      nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv ;;
    install)
      cp "$W"/part2/* /tmp/fa4/
      cd /tmp/fa4 && cat nvidia_cutlass_dsl_libs_cu13-*.whl.part00 nvidia_cutlass_dsl_libs_cu13-*.whl.part01 \
        > "$(ls nvidia_cutlass_dsl_libs_cu13-*.part00 | sed 's/.part00$//')" && rm -f ./*.part0? && cd - >/dev/null
      # the image's own cuda-bindings and protobuf win where it has them
      python3 -c "import cuda.bindings" 2>/dev/null && rm -f /tmp/fa4/cuda_bindings-* /tmp/fa4/cuda_python-* /tmp/fa4/cuda_pathfinder-*
      python3 -c "import google.protobuf" 2>/dev/null && rm -f /tmp/fa4/protobuf-*
      python3 -m pip install -q --no-deps --target "$SITE" /tmp/fa4/*.whl
      with_fa4 python3 -c "import flash_attn.cute as f; print('flash_attn.cute', f.flash_attn_varlen_func.__module__)"
      install_self ;;
    tests)  # every GPU test, the flash ones on the real FA4
      install_self
      # FA4 JIT-compiles each kernel configuration on the host (4-18 s each): WORKERS processes
      # share the GPU so those compiles overlap; -rP brings each test's printed errors back
      with_fa4 timeout "${TESTS_TIMEOUT:-480}" python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider -rP \
        -n "${WORKERS:-8}" -k "${TESTS:-flash_attn or compiled}" > "$OUT/gpu_tests_fa4_full.log" 2>&1 || true
      grep -E "relative error|compiled:|passed|failed|FAILED|ERROR|Error" "$OUT/gpu_tests_fa4_full.log" \
        | tail -${TAIL:-150} | tee "$OUT/gpu_tests_fa4.log" ;;
    probe)
      with_fa4 python3 scripts/fa4_probe.py 2>&1 | tee "$OUT/fa4_probe.log" ;;
    compile)  # graph breaks and recompiles with inductor and the real kernels
      for backend in torch flash_attn; do
        with_fa4 timeout "${COMPILE_TIMEOUT:-300}" python3 -u scripts/compile_check.py --device cuda --dtype bfloat16 --backend "$backend" \
          --compiler inductor --batches 20 --types "${TYPES:-llama,gpt2,mistral,qwen2,gemma2,qwen3}" 2>&1 \
          | grep -v "^\[transformers\]" | tee "$OUT/compile_$backend.md" || true
      done ;;
    bench-gpt2)  # the GPT-2 table, every row, both backends, one run
      with_fa4 python3 scripts/bench_gpt2.py --backends torch,flash_attn --out "$OUT/gpt2" 2>&1 \
        | grep -vi "warn\|exe_args" | tail -${TAIL:-40} ;;
    bench-llama)  # Llama-3-8B shape with gradient checkpointing, repeated for the spread
      with_fa4 python3 scripts/bench_llama.py --shape 8b --dists flan --modes padded,upstream,packed,oracle \
        --backends torch,flash_attn --repeats "${REPEATS:-3}" --steps "${STEPS:-6}" --warmup 2 --out "$OUT/llama8b" 2>&1 \
        | grep -vi "warn" | tail -${TAIL:-40} ;;
    bench-kernels)  # where the eager gap to the oracle lies: one profiled step per row, by kernel family
      with_fa4 python3 scripts/bench_gpt2.py --backends torch,flash_attn --breakdown --out "$OUT/gpt2_kernels" \
        --rows "${ROWS:-c_torch_eager,c_torch_cu_eager,c_flash_attn_eager,c_flash_attn_cu_eager,d_oracle_eager,c_torch_cu_compiled,c_flash_attn_cu_compiled,d_oracle_compiled}" \
        2>&1 | grep -vi "warn\|exe_args" | tail -${TAIL:-120}
      pack_traces gpt2_kernels ;;
    fa2-build)
      if [ ! -d /tmp/fa2/flash_attn-2.8.3 ]; then
        mkdir -p /tmp/fa2 && tar xzf .whl/fa2/flash_attn-2.8.3.tar.gz -C /tmp/fa2
        [ "${FA2_FULL:-0}" = 1 ] || python3 scripts/fa2_trim.py /tmp/fa2/flash_attn-2.8.3 --head-dims "${FA2_HEAD_DIMS:-64,128}"
      fi
      objects=$(grep -c '"csrc/flash_attn/.*\.c[up]p*"' /tmp/fa2/flash_attn-2.8.3/setup.py || true)
      t0=$(date +%s)
      (cd /tmp/fa2/flash_attn-2.8.3 && FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTN_CUDA_ARCHS=90 MAX_JOBS="${MAX_JOBS:-13}" \
        NVCC_THREADS=1 timeout "${FA2_TIMEOUT:-540}" python3 -m pip wheel -v --no-build-isolation --no-deps -w /tmp/fa2/wheel . \
        > /tmp/fa2/build.log 2>&1) || echo "build stopped (rc $?): run fa2-build again while the machine is warm"
      built=$(find /tmp/fa2/flash_attn-2.8.3/build -name "*.o" 2>/dev/null | wc -l)
      echo "objects built: $built of $objects; this call $(( $(date +%s) - t0 )) s; wheel: $(ls /tmp/fa2/wheel 2>/dev/null || echo none)"
      grep -E " error|Error" /tmp/fa2/build.log | tail -5; cp /tmp/fa2/build.log "$OUT/fa2_build.log" ;;
    fa2-tests)
      python3 -m pip install -q --no-deps --target /tmp/site_fa2 /tmp/fa2/wheel/flash_attn-*.whl
      PYTHONPATH=/tmp/site_fa2 python3 -c "import flash_attn; print('flash_attn', flash_attn.__version__)"
      install_self
      PYTHONPATH=/tmp/site_fa2 timeout "${TESTS_TIMEOUT:-420}" python3 -m pytest tests/test_gpu.py -q -p no:cacheprovider -rP \
        -n "${WORKERS:-8}" -k "${TESTS:-flash_attn or compiled}" > "$OUT/gpu_tests_fa2_full.log" 2>&1 || true
      grep -E "relative error|compiled:|passed|failed|FAILED|ERROR|Error" "$OUT/gpu_tests_fa2_full.log" \
        | tail -${TAIL:-150} | tee "$OUT/gpu_tests_fa2.log" ;;
    fa2-bench)
      PYTHONPATH=/tmp/site_fa2 python3 scripts/bench_gpt2.py --backends flash_attn --breakdown --out "$OUT/gpt2_fa2" \
        --rows "${ROWS:-b_upstream_fa2,c_flash_attn_eager,c_flash_attn_cu_eager,d_oracle_eager,c_flash_attn_cu_compiled,d_oracle_compiled}" \
        2>&1 | grep -vi "warn\|exe_args" | tail -${TAIL:-80}
      pack_traces gpt2_fa2 ;;
  esac
done
