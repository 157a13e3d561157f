#!/usr/bin/env bash
# Create (or reuse) a virtual environment with the project installed, on a CPU machine.
#   VENV=.venv TRANSFORMERS_VERSION=5.25.0 TORCH_VERSION=2.13.0 bash scripts/setup_env.sh
# An existing environment keeps the torch and transformers it has unless TORCH_VERSION or
# TRANSFORMERS_VERSION asks for another release; a new one gets torch 2.13.0 and transformers 5.25.0.
# torch goes in first, pinned, so that no later requirement pulls a newer release. pip takes the
# wheel its configured sources serve for that version: on this project's machines a CPU build lies
# on local disk (pip's find-links); PyPI alone serves the CUDA build for Linux x86_64 (several GB).
# Progress goes to stderr as it happens; the last line, on stdout, names what the environment holds.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
DEFAULT_TORCH="2.13.0"
DEFAULT_TRANSFORMERS="5.25.0"
say() { echo "setup_env: $*" >&2; }
pip_q() {  # quiet install; on failure show pip's output and stop
  local log
  log="$(mktemp)"
  if ! "${VENV}/bin/python" -m pip install -q --disable-pip-version-check "$@" >"${log}" 2>&1; then
    cat "${log}" >&2; rm -f "${log}"; say "pip install $* failed"; exit 1
  fi
  rm -f "${log}"
}
installed() {  # the installed distribution's version of $1 (what pip sees), or nothing
  "${VENV}/bin/python" - "$1" <<'PY'
import importlib.metadata as metadata
import sys

try:
    print(metadata.version(sys.argv[1]))
except metadata.PackageNotFoundError:
    pass
PY
}
same_release() {  # $1 installed, $2 asked for; a local label (+cpu, +cu132) counts only if asked for
  if [[ "$2" == *+* ]]; then [ "$1" = "$2" ]; else [ "${1%%+*}" = "$2" ]; fi
}

if [ ! -x "${VENV}/bin/python" ]; then
  say "creating ${VENV}"
  "${PY}" -m venv "${VENV}"
fi
have_torch="$(installed torch)"
have_transformers="$(installed transformers)"

torch_version="${have_torch}"
if [ -z "${have_torch}" ] || { [ -n "${TORCH_VERSION:-}" ] && ! same_release "${have_torch}" "${TORCH_VERSION}"; }; then
  torch_version="${TORCH_VERSION:-${DEFAULT_TORCH}}"
  say "installing torch ${torch_version} into ${VENV}${have_torch:+ (replacing ${have_torch})} ..."
  pip_q "torch==${torch_version}"
  torch_version="$(installed torch)"
  say "$("${VENV}/bin/python" -W ignore -c "import torch; print(f'got torch {torch.__version__}, ' + \
        (f'a CUDA {torch.version.cuda} build' if torch.version.cuda else 'a CPU-only build'))")"
fi
# the installed distribution's release without its local label: `torch==2.15.0` accepts the
# installed 2.15.0+cu132 (or +cpu) build, where torch.__version__'s label may not match the
# distribution's own version and make the constraint unsatisfiable
constraints="$(mktemp)"
trap 'rm -f "${constraints}"' EXIT
echo "torch==${torch_version%%+*}" >"${constraints}"

transformers_version="${have_transformers}"
if [ -z "${have_transformers}" ] || \
   { [ -n "${TRANSFORMERS_VERSION:-}" ] && ! same_release "${have_transformers}" "${TRANSFORMERS_VERSION}"; }; then
  transformers_version="${TRANSFORMERS_VERSION:-${DEFAULT_TRANSFORMERS}}"
  say "installing transformers ${transformers_version} into ${VENV}${have_transformers:+ (replacing ${have_transformers})} ..."
  pip_q "transformers==${transformers_version}" -c "${constraints}"
  transformers_version="$(installed transformers)"
fi
if [ "${torch_version}" = "${have_torch}" ] && [ "${transformers_version}" = "${have_transformers}" ]; then
  say "using existing ${VENV}: transformers ${transformers_version}, torch ${torch_version}"
fi
# keep torch and transformers where they are while the extras (trl, peft, ...) resolve
echo "transformers==${transformers_version}" >>"${constraints}"
say "installing what is missing of hf-varlen-patch[dev] (trl, peft, accelerate, datasets, pytest, ruff) ..."
pip_q -e ".[dev]" -c "${constraints}"
# DeepSpeed (ZeRO-2/3 in tests/test_distributed.py) is published as source only and its build
# imports torch: built against this venv's torch (no build isolation, which would fetch another
# torch), with no compiled ops (they JIT-build where used; the CPU tests need none)
if ! "${VENV}/bin/python" -c "import deepspeed" 2>/dev/null; then
  say "building deepspeed 0.19.8 against this torch (no compiled ops) ..."
  DS_BUILD_OPS=0 pip_q --no-build-isolation "deepspeed==0.19.8" "setuptools>=70" wheel -c "${constraints}"
fi
"${VENV}/bin/python" - <<'PY'
import torch, transformers, trl, peft, hf_varlen_patch
print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, "
      f"peft {peft.__version__}, hf_varlen_patch {hf_varlen_patch.__version__}")
PY
