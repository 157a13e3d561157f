#!/usr/bin/env bash
# Issue 10's GPU part on nvidia-h200-x2 (two GPUs, NCCL), one command:
#   bash scripts/gpu_distributed.sh          results (JSON, profiler trace) under $OUT
# For FSDP2 and DDP on a ~1B Llama-style model in bf16: packed + apply vs one process padded on the
# same global batch (parameters after 3 SGD steps, relative to the update, next to bf16's own noise:
# the padded run in bf16 vs fp32), the collectives with and without the patch (profiler), and
# packed vs padded tokens/s and peak memory per rank (FLAN-like lengths, 8 sequences per rank).
# DeepSpeed ZeRO-3 and ZeRO-2 through accelerate: carry .whl/deepspeed (see below).
set -euo pipefail
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
nvidia-smi --query-gpu=name,memory.total --format=csv
run() { python3 -m torch.distributed.run --standalone --nproc_per_node 2 scripts/distributed_equivalence.py \
  --device cuda --dtype bfloat16 --model-type llama --size 1b --steps 3 --lr 1e-3 "$@" 2>&1 | grep -E '^\{|Error' ; }
for engine in fsdp2 ddp; do
  echo "== $engine, packed + apply"
  run --engine "$engine" --bench "${BENCH:-8}" --trace "$OUT/trace_${engine}.json" --out "$OUT/${engine}_1b.json"
  echo "== $engine, unpatched (for the collective counts)"
  run --engine "$engine" --no-apply --out "$OUT/${engine}_1b_unpatched.json"
done
echo "== accelerate launch --multi_gpu (Accelerator.prepare), packed + apply"
accelerate launch --multi_gpu --num_processes 2 --mixed_precision no scripts/distributed_equivalence.py \
  --engine accelerate --device cuda --dtype bfloat16 --model-type llama --size 1b --steps 3 --lr 1e-3 \
  --out "$OUT/accelerate_1b.json" 2>&1 | grep -E '^\{|Error' || echo "accelerate launch failed"
# DeepSpeed is not in the image: carry .whl/deepspeed (deepspeed 0.19.8 built here as a
# py3-none-any wheel with DS_BUILD_OPS=0, and hjson / pydantic for Python 3.12), run with
# carry [".whl/deepspeed"]; its ops JIT-build where needed (nvcc and ninja are in the image)
if [ -d .whl/deepspeed ] && ! python3 -c "import deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-deps --target /tmp/site_ds .whl/deepspeed/*.whl && export PYTHONPATH="/tmp/site_ds${PYTHONPATH:+:$PYTHONPATH}"
fi
if python3 -c "import deepspeed" 2>/dev/null; then
  for engine in deepspeed3 deepspeed2; do
    echo "== $engine (ZeRO through accelerate's DeepSpeedPlugin), packed + apply, then unpatched"
    run --engine "$engine" --out "$OUT/${engine}_1b.json"
    run --engine "$engine" --no-apply --out "$OUT/${engine}_1b_unpatched.json"
  done
else
  echo "== DeepSpeed is not installed on this machine (carry .whl/deepspeed): ZeRO not run"
fi
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for engine in ("fsdp2", "ddp", "deepspeed3", "deepspeed2"):
    if not (out / f"{engine}_1b.json").exists():
        continue
    a, b = (json.loads((out / f"{engine}_1b{s}.json").read_text()) for s in ("", "_unpatched"))
    print(f"{engine} ({a.get('wrapper')}): relative update difference {a['relative_update_diff']:.2e} (bf16 noise "
          f"{a.get('relative_update_noise', float('nan')):.2e}), unpatched {b['relative_update_diff']:.2e}; "
          f"collectives equal with and without the patch: {a['collectives_per_rank'] == b['collectives_per_rank']}")
    for rank, r in (a.get("bench") or {}).items():
        p, q = r["packed"], r["padded"]
        print(f"  {rank}: packed {p['tokens_per_s']:,.0f} tok/s, {p['peak_gb']:.1f} GB; padded {q['tokens_per_s']:,.0f} "
              f"tok/s, {q['peak_gb']:.1f} GB ({p['tokens_per_s'] / q['tokens_per_s']:.2f}x tokens/s)")
PY
