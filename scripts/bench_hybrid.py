"""Padding vs packing on a ~0.5B Qwen3.5-style hybrid (Gated DeltaNet + full attention, 3:1).

Same protocol as ``bench_llama.py`` (its step, lengths and tables): 8 sequences per step, FLAN-like
or OrcaMath-like lengths, padded to the batch's longest (upstream, attention_mask) or packed into
one row after ``hf_varlen_patch.apply``. The Gated DeltaNet layers run flash-linear-attention when
it is installed (upstream without boundaries when padded, with ``cu_seqlens`` when packed), else
both run the torch reference paths.

    python scripts/bench_hybrid.py --out benchmarks
    python scripts/bench_hybrid.py --tiny --device cpu --backend sdpa --steps 1 --warmup 0   # smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_llama  # noqa: E402
from _bench_common import device_name, write_outputs  # noqa: E402


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dists", default="flan,orcamath")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="benchmarks")
    args = parser.parse_args()
    args.builder = build_hybrid

    import transformers

    fla = importlib.util.find_spec("fla") is not None
    results = []
    for dist in args.dists.split(","):
        for mode in ("padded", "packed"):
            print(f"running {dist} {mode} ...", flush=True)
            results.append(bench_llama.run(dist, mode, args))
            r = results[-1]
            print(f"  {r.median_ms:.1f} ms/step, {r.tokens_per_s:,.0f} tok/s, {r.peak_gb:.1f} GB", flush=True)
    meta = dict(device=device_name(), torch=torch.__version__, transformers=transformers.__version__,
                backend=args.backend, gated_deltanet="flash-linear-attention" if fla else "torch reference",
                batch=args.batch, steps=args.steps, warmup=args.warmup)  # fmt: skip
    name = f"hybrid_padding_vs_packing_{'fla' if fla else 'torch'}"
    title = f"Qwen3.5-style hybrid: padding vs packing ({meta['gated_deltanet']})"
    table = write_outputs(results, Path(args.out), name, title, meta, results[0].row)
    ratios = ["", "| mix | packed / padded tokens/s | packed / padded peak memory |", "| --- | --- | --- |"]
    for k in range(0, len(results) - 1, 2):
        pad, pack = results[k], results[k + 1]
        mem = pack.peak_gb / pad.peak_gb if pad.peak_gb else float("nan")
        ratios.append(f"| {pad.row.split(':')[0]} | {pack.tokens_per_s / pad.tokens_per_s:.2f}x | {mem:.2f}x |")
    print("\n".join(ratios))
    (Path(args.out) / f"{name}.md").write_text(table + "\n" + "\n".join(ratios) + "\n")


if __name__ == "__main__":
    main()
