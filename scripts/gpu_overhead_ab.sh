#!/usr/bin/env bash
# Per-forward overhead of this tree next to an earlier one, on one GPU in one run (alternating,
# two rounds each, so drift shows): scripts/bench_overhead.py under each, reports under $OUT.
#   git archive <rev> | tar -x -C out/ab_before      # on the host, before the device call
#   bash scripts/gpu_overhead_ab.sh out/ab_before     # on the device, from the repository root
set -euo pipefail
before="${1:?the earlier tree (a directory with its own pyproject.toml)}"
out="${OUT:-/tmp/ab}"
for round in 1 2; do
  for side in before after; do
    dir="$([ "${side}" = before ] && echo "${before}" || echo .)"
    python3 -m pip install -q --no-deps --no-build-isolation -e "${dir}" >/dev/null
    echo "== ${side} (${dir}), round ${round}"
    (cd "${dir}" && python3 scripts/bench_overhead.py --out "${out}/${side}${round}" | tail -n 12)
  done
done
