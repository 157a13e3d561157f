"""Padding vs packing on ~0.5B hybrids: Qwen3.5-style (Gated DeltaNet + full attention, 3:1) or
Bamba-style (Mamba-2 + full attention, 5:1), ``--model qwen3_5|bamba``.

Same protocol as ``bench_llama.py`` (its step, lengths and tables): 8 sequences per step, FLAN-like
or OrcaMath-like lengths, padded to the batch's longest (upstream, attention_mask) or packed into
one row after ``hf_varlen_patch.apply``. Padded runs use whatever upstream finds installed
(flash-linear-attention for Gated DeltaNet, mamba_ssm's Triton SSD for Mamba-2, causal-conv1d for
the convolution when built). A packed row's backend may name how its recurrent layers run:
``torch+ops`` (the exact torch ops, ``HF_VARLEN_RECURRENT_KERNELS=0``), ``torch+kernels`` (the
fused kernels with boundaries, ``=all``: fla's gated delta rule with ``cu_seqlens``, mamba_ssm's
SSD with ``seq_idx``, a short convolution with resets), ``torch+verified`` (only
kernels.VERIFIED); a plain backend leaves the setting as it is. The three rows that matter:

    (a) upstream padded with kernels   (b) packed + apply, torch ops   (c) packed + apply, kernels
    python scripts/bench_hybrid.py --out benchmarks --backends torch+ops,torch+kernels [--model bamba]
    python scripts/bench_hybrid.py --tiny --device cpu --backend sdpa --steps 1 --warmup 0   # smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_llama  # noqa: E402


def build_hybrid(args):
    if getattr(args, "hybrid", "qwen3_5") == "bamba":
        return build_bamba(args)
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


def build_bamba(args):
    """Mamba-2 mixers (32 heads of 64, state 128, one group, chunk 256) with attention every 6th layer."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    torch.manual_seed(0)
    size = (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16, vocab_size=256,
             attn_layer_indices=[3])
        if args.tiny
        else dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=8,
                  num_key_value_heads=2, mamba_n_heads=32, mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1,
                  mamba_chunk_size=256, vocab_size=32000, attn_layer_indices=[5, 11, 17, 23])
    )  # fmt: skip
    cfg = CONFIG_MAPPING["bamba"](**size, mamba_expand=2)
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
    result.row = row_label(dist, mode, backend, bench_llama.compiled_mode(mode, args))
    return result


def row_label(dist: str, mode: str, backend: str | None, compiled: bool = False) -> str:
    attention, recurrent = _split(backend)
    suffix = ", compiled" if compiled else ""
    if mode == "padded":
        return f"{dist}: (a) padded to longest, upstream ({_upstream_recurrence()}){suffix}"
    if mode == "packed" and recurrent is not None:
        tag = {"ops": "(b)", "kernels": "(c)", "verified": "(c)"}[recurrent]
        what = {"ops": "torch ops", "kernels": "kernels", "verified": "verified kernels"}[recurrent]
        return f"{dist}: {tag} packed + apply({attention}), recurrent {what}{suffix}"
    return _row_label(dist, mode, backend, compiled)


bench_llama.run, bench_llama.row_label = run, row_label
_MODEL = {"hybrid": "qwen3_5"}  # set from --model before any row is labelled


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _upstream_recurrence() -> str:
    """What upstream's padded run has for its recurrent layers on this machine."""
    conv = "causal-conv1d" if _installed("causal_conv1d") else "torch conv"
    if _MODEL["hybrid"] == "bamba":
        scan = "mamba_ssm SSD" if _installed("mamba_ssm.ops.triton.ssd_combined") else "torch SSD"
    else:
        scan = "fla" if _installed("fla") else "torch delta rule"
    return f"{scan}, {conv}"


def _add_arguments(parser) -> None:
    parser.add_argument("--model", dest="hybrid", choices=["qwen3_5", "bamba"], default="qwen3_5")
    parser.add_argument(
        "--warm-timed",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run each timed batch once untimed first (Triton compiles per shape class): the steady state",
    )


def _named(args) -> str:
    _MODEL["hybrid"] = args.hybrid
    kernels = "kernels" if _installed("fla") or _installed("mamba_ssm") else "torch"
    return f"hybrid_padding_vs_packing_{kernels}" + ("" if args.hybrid == "qwen3_5" else f"_{args.hybrid}")


def main() -> None:
    styles = {"qwen3_5": "Qwen3.5-style (Gated DeltaNet)", "bamba": "Bamba-style (Mamba-2)"}
    bench_llama.main(
        builder=build_hybrid,
        name=_named,
        title=lambda args: f"{styles[args.hybrid]} hybrid ~0.5B: padding vs packing ({_upstream_recurrence()})",
        extra_meta=lambda args: {
            "model": args.hybrid,
            "upstream_recurrence": _upstream_recurrence(),
            "warm_timed": args.warm_timed,
        },
        description=__doc__,
        add_arguments=_add_arguments,
    )


if __name__ == "__main__":
    main()
