"""Padding vs packing on a ~0.5B Qwen3.5-style hybrid (Gated DeltaNet + full attention, 3:1).

Same protocol as ``bench_llama.py`` (its step, lengths and tables): 8 sequences per step, FLAN-like
or OrcaMath-like lengths, padded to the batch's longest (upstream, attention_mask) or packed into
one row after ``hf_varlen_patch.apply``. Padded runs use flash-linear-attention for the Gated
DeltaNet layers when it is installed (upstream's choice); packed runs use the exact torch ops unless
``HF_VARLEN_RECURRENT_KERNELS=all`` opts into fla with ``cu_seqlens``.

    python scripts/bench_hybrid.py --out benchmarks
    python scripts/bench_hybrid.py --tiny --device cpu --backend sdpa --steps 1 --warmup 0   # smoke test
"""

from __future__ import annotations

import importlib.util
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
