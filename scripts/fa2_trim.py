"""Trim a flash-attn 2.x source tree to a few head dims and bf16, so its sm_90 build fits a session.

The full build compiles 73 CUDA objects (6 head dims x fp16/bf16 x causal x fwd/split/bwd), about
30 min on 16 cores. This keeps only the kernels the GPU tests and benchmarks use: bf16 at the
head-dim buckets given (default 64 and 128; FA2's kernels take any head dim up to their bucket,
with predication, so 16- and 32-dim twins run on the 64 kernel and 80/96 on the 128 one). Every
other request raises inside the extension with a message naming this trim, never a wrong result.

Usage: python scripts/fa2_trim.py SRC_DIR [--head-dims 64,128]
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

ALL_DIMS = (32, 64, 96, 128, 192, 256)


def _switch(dims: list[int]) -> str:
    """The HEADDIM_SWITCH macro routing each head dim to the smallest kept bucket, refusing above."""
    lines = ["#define HEADDIM_SWITCH(HEADDIM, ...)   \\", "  [&] {                                    \\"]
    for i, dim in enumerate(dims):
        kw = "if" if i == 0 else "} else if"
        lines += [
            f"    {kw} (HEADDIM <= {dim}) {{ \\",
            f"      constexpr static int kHeadDim = {dim};  \\",
            "      return __VA_ARGS__();                \\",
        ]
    lines += [
        "    } else {                              \\",
        f'      TORCH_CHECK(false, "flash-attn was built by scripts/fa2_trim.py for head dims <= {dims[-1]} '
        'only; head dim ", HEADDIM, " needs a full build"); \\',
        "    }                                      \\",
        "  }()",
    ]
    return "\n".join(lines)


_FP16 = """#define FP16_SWITCH(COND, ...)               \\
  [&] {                                      \\
    TORCH_CHECK(!(COND), "flash-attn was built by scripts/fa2_trim.py for bf16 only; fp16 needs a full build"); \\
    using elem_type = cutlass::bfloat16_t;   \\
    return __VA_ARGS__();                    \\
  }()"""


def trim(src: Path, dims: list[int]) -> int:
    """Rewrite setup.py's source list and the dispatch macros in place; return the kernels kept."""
    switch_h = src / "csrc/flash_attn/src/static_switch.h"
    text = switch_h.read_text()
    for macro, body in (("FP16_SWITCH", _FP16), ("HEADDIM_SWITCH", _switch(dims))):
        text, found = re.subn(rf"#define {macro}\(.*?\}}\(\)", lambda _, b=body: b, text, count=1, flags=re.S)
        if not found:  # another release's layout: trimming the sources alone would not link
            raise SystemExit(f"fa2_trim: no {macro} macro in {switch_h}; this release needs the trim updated")
    switch_h.write_text(text)

    setup = src / "setup.py"
    kept = 0
    out = []
    for line in setup.read_text().splitlines(keepends=True):
        m = re.search(r'"csrc/flash_attn/src/flash_(?:fwd|bwd|fwd_split)_hdim(\d+)_(fp16|bf16)', line)
        if m and (int(m.group(1)) not in dims or m.group(2) != "bf16"):
            continue
        kept += bool(m)
        out.append(line)
    setup.write_text("".join(out))
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("--head-dims", default="64,128")
    args = parser.parse_args()
    dims = sorted(int(d) for d in args.head_dims.split(","))
    unknown = set(dims) - set(ALL_DIMS)
    if unknown:
        raise SystemExit(f"unknown head-dim buckets {sorted(unknown)}; FA2 has {list(ALL_DIMS)}")
    kept = trim(args.src, dims)
    print(f"fa2_trim: kept {kept} CUDA kernels (bf16, head dims {dims})")


if __name__ == "__main__":
    main()
