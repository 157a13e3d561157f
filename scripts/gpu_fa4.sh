#!/usr/bin/env bash
# FlashAttention-4 (flash-attn-4 4.0.0b36, module flash_attn.cute) onto the GPU machine (no network),
# in stages. The wheels (pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux_2_28_x86_64 ...) are more than one call may carry, so:
#   here:   bash scripts/gpu_fa4.sh split      cut the 92 MB libs-cu13 wheel into .whl/fa4/part1 and part2
#   call 1: bash scripts/gpu_fa4.sh stash      (carry .whl/fa4/part1) copies part 1 to /tmp/fa4
#   call 2: bash scripts/gpu_fa4.sh install probe bench   (carry .whl/fa4/part2, within 30 s of call 1)
# install joins the parts and installs everything with --target /tmp/site; probe runs scripts/fa4_probe.py.
set -euo pipefail
W="${W:-.whl/fa4}"
SITE=/tmp/site
export PYTHONPATH="$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages${PYTHONPATH:+:$PYTHONPATH}"
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
      mkdir -p /tmp/fa4 && cp "$W"/part1/* /tmp/fa4/ && ls /tmp/fa4 | wc -l ;;
    install)
      cp "$W"/part2/* /tmp/fa4/
      cd /tmp/fa4 && cat nvidia_cutlass_dsl_libs_cu13-*.whl.part00 nvidia_cutlass_dsl_libs_cu13-*.whl.part01 \
        > "$(ls nvidia_cutlass_dsl_libs_cu13-*.part00 | sed 's/.part00$//')" && rm -f ./*.part0? && cd - >/dev/null
      # the image's own cuda-bindings and protobuf win where it has them
      python3 -c "import cuda.bindings" 2>/dev/null && rm -f /tmp/fa4/cuda_bindings-* /tmp/fa4/cuda_python-* /tmp/fa4/cuda_pathfinder-*
      python3 -c "import google.protobuf" 2>/dev/null && rm -f /tmp/fa4/protobuf-*
      python3 -m pip install -q --no-deps --target "$SITE" /tmp/fa4/*.whl
      python3 -c "import flash_attn.cute as f; print('flash_attn.cute', f.flash_attn_varlen_func.__module__)" ;;
    probe)
      python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
      python3 scripts/fa4_probe.py 2>&1 | tee "${OUT:-/tmp}/fa4_probe.log" ;;
    bench)  # the GPT-2 packing experiment's packed rows, torch then flash_attn backend, one call
      for backend in torch flash_attn; do
        python3 scripts/bench_gpt2.py --backend "$backend" --rows "${ROWS:-c_patched_eager,c_patched_compiled}" \
          --out "${OUT:-/tmp}/gpt2_$backend" 2>&1 | grep -vi "warn\|exe_args" | tail -6
      done ;;
  esac
done
