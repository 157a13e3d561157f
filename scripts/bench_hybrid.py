"""Padding vs packing on a ~0.5B Qwen3.5-style hybrid (Gated DeltaNet + full attention, 3:1).

Same protocol as ``bench_llama.py`` (its step, lengths and tables): 8 sequences per step, FLAN-like
or OrcaMath-like lengths, padded to the batch's longest (upstream, attention_mask) or packed into
one row after ``hf_varlen_patch.apply``. Padded runs use flash-linear-attention for the Gated
DeltaNet layers when it is installed (upstream's choice). A packed row's backend may name how its
recurrent layers run: ``torch+ops`` (the exact torch ops, ``HF_VARLEN_RECURRENT_KERNELS=0``),
``torch+kernels`` (the fused kernels with boundaries, ``=all``: fla's gated delta rule with
``cu_seqlens`` and its Triton short convolution), ``torch+verified`` (only kernels.VERIFIED);
a plain backend leaves the setting as it is. The three rows that matter:

    (a) upstream padded with kernels   (b) packed + apply, torch ops   (c) packed + apply, kernels
    python scripts/bench_hybrid.py --out benchmarks --backends torch+ops,torch+kernels
    python scripts/bench_hybrid.py --tiny --device cpu --backend sdpa --steps 1 --warmup 0   # smoke test
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_llama  # noqa: E402


def build_hybrid(args):
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    torch.manual_seed(0)
    size = (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
             linear_num_value_heads=4, vocab_size=256)
        if args.tiny
        else dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=128, linear_key_head_dim=128, linear_value_head_dim=128,
                  linear_num_key_heads=8, linear_num_value_heads=16, vocab_size=32000)
    )  # fmt: skip
    layers = size["num_hidden_layers"]
    cfg = CONFIG_MAPPING["qwen3_5_text"](
        **size, layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)]
    )
    model = AutoModelForCausalLM.from_config(cfg).to(args.device).train()
    return model, cfg


#: a packed row's recurrent setting -> HF_VARLEN_RECURRENT_KERNELS
RECURRENT = {"ops": "0", "kernels": "all", "verified": "1"}
_run, _row_label = bench_llama.run, bench_llama.row_label


def _split(backend: str | None) -> tuple[str | None, str | None]:
    if backend is None or "+" not in backend:
        return backend, None
    attention, recurrent = backend.split("+", 1)
    return attention, recurrent


def run(dist: str, mode: str, args, backend: str | None = None):
    """bench_llama's row, with the packed row's recurrent setting in HF_VARLEN_RECURRENT_KERNELS."""
    attention, recurrent = _split(backend)
    before = os.environ.get("HF_VARLEN_RECURRENT_KERNELS")
    if recurrent is not None:
        os.environ["HF_VARLEN_RECURRENT_KERNELS"] = RECURRENT[recurrent]
    from hf_varlen_patch.recurrent import kernels

    kernels.KERNEL_USAGE.clear()
    try:
        result = _run(dist, mode, args, attention)
    finally:
        if before is None:
            os.environ.pop("HF_VARLEN_RECURRENT_KERNELS", None)
        else:
            os.environ["HF_VARLEN_RECURRENT_KERNELS"] = before
    if kernels.KERNEL_USAGE:
        result.note = f"{result.note}; kernels {dict(kernels.KERNEL_USAGE)}"
    result.row = row_label(dist, mode, backend)
    return result


def row_label(dist: str, mode: str, backend: str | None) -> str:
    attention, recurrent = _split(backend)
    if mode == "padded":
        upstream = "fla kernels" if importlib.util.find_spec("fla") is not None else "torch ops"
        return f"{dist}: (a) padded to longest, upstream ({upstream})"
    if mode == "packed" and recurrent is not None:
        tag = {"ops": "(b)", "kernels": "(c)", "verified": "(c)"}[recurrent]
        what = {"ops": "torch ops", "kernels": "kernels", "verified": "verified kernels"}[recurrent]
        return f"{dist}: {tag} packed + apply({attention}), recurrent {what}"
    return _row_label(dist, mode, backend)


bench_llama.run, bench_llama.row_label = run, row_label


def main() -> None:
    fla = importlib.util.find_spec("fla") is not None
    recurrence = "flash-linear-attention" if fla else "torch reference"
    bench_llama.main(
        builder=build_hybrid,
        name=f"hybrid_padding_vs_packing_{'fla' if fla else 'torch'}",
        title=f"Qwen3.5-style hybrid ~0.5B: padding vs packing ({recurrence})",
        extra_meta={"gated_deltanet": recurrence},
        description=__doc__,
    )


if __name__ == "__main__":
    main()
