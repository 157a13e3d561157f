#!/usr/bin/env bash
# Regenerate docs/coverage.md: `hf-varlen-patch scan --all --json` on transformers 4.57.6 and on
# the newest 5.x CI tests, each in its own environment, then render both side by side.
#   bash scripts/coverage.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(mktemp -d)"
for tf in "4.57.6" "5.25.0"; do
  VENV=".venv-tf${tf}" TRANSFORMERS_VERSION="${tf}" bash scripts/setup_env.sh >&2
  ".venv-tf${tf}/bin/hf-varlen-patch" scan --all --json "${out}/${tf}.json" >"${out}/${tf}.txt" || true
  tail -n 1 "${out}/${tf}.txt"
done
mkdir -p docs
.venv-tf5.25.0/bin/hf-varlen-patch coverage-doc "${out}/4.57.6.json" "${out}/5.25.0.json" -o docs/coverage.md
echo "wrote docs/coverage.md"
