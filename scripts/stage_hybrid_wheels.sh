#!/usr/bin/env bash
# Build what scripts/gpu_hybrid.sh carries to the GPU machine (no network there), on a machine with
# PyPI: .whl/hybrid (fla 0.6.0, fla-core, einops wheels; mamba_ssm's sdist for its Triton SSD) and
# .whl/triton_parts (Triton 3.7.1 for cp312, trimmed to fit one 64 MiB carry: libtriton.so stripped,
# the profiler, cupti, cuobjdump/nvdisasm, ptxas-blackwell and a test library left out; tar | xz -9).
# .whl is git-ignored, so a fresh checkout runs this once before the first GPU call.
set -euo pipefail
cd "$(dirname "$0")/.."
W=.whl/hybrid; P=.whl/triton_parts; T="$(mktemp -d)"
mkdir -p "$W" "$P"
python3 -m pip download -q --no-deps -d "$W" flash-linear-attention==0.6.0 fla-core==0.6.0 einops==0.8.2
# pip download would build the sdist's metadata (it needs torch); the index serves the file directly
url="$(curl -fsS https://pypi.org/simple/mamba-ssm/ | grep -o 'href="[^"]*mamba_ssm-2.3.2.post1.tar.gz[^"]*"' |
  head -1 | sed 's/^href="//; s/"$//; s/#.*//')"
curl -fsSL -o "$W/mamba_ssm-2.3.2.post1.tar.gz" "$url"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 -d "$T" triton==3.7.1
mkdir "$T/u" && (cd "$T/u" && python3 -m zipfile -e "$T"/triton-3.7.1-*.whl .)
n="$T/u/triton/backends/nvidia"
rm -rf "$n/lib/cupti" "$n/bin/ptxas-blackwell" "$n/bin/cuobjdump" "$n/bin/nvdisasm" \
  "$T/u/triton/_C/libproton.so" "$T/u/triton/instrumentation/libGPUInstrumentationTestLib.so"
strip --strip-unneeded "$T/u/triton/_C/libtriton.so"
chmod +x "$n"/bin/*  # Python's zipfile drops the mode bits; Triton runs ptxas from here
rm -f "$P"/part* "$P"/sha256
tar -C "$T/u" -cf - . | xz -9 -T2 > "$T/triton.tar.xz"
(cd "$T" && sha256sum triton.tar.xz) > "$P/sha256"
split -b 60m "$T/triton.tar.xz" "$P/part"
rm -rf "$T"
ls -la "$W" "$P"
