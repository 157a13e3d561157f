"""Padding vs packing on a Llama-style ~0.85B model (GQA, random weights, bf16 autocast).

Two synthetic length distributions, shaped like the published experiments:
  FLAN-like     short and widely varying: lognormal, median 200 tokens, sigma 1.0, clipped to [8, 2048]
  OrcaMath-like longer and narrow:        normal, mean 600, sd 150, clipped to [200, 1100]
Each step trains on the same 8 sequences either padded to the batch's longest (SDPA with an
attention_mask, upstream) or packed into one row (hf_varlen_patch.apply, backend `torch`).
Reports tokens/s (real tokens) and peak memory, as a table + JSON + PNG.

    python scripts/bench_llama.py --out benchmarks
    python scripts/bench_llama.py --tiny --device cpu --backend sdpa     # smoke test
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import device_name, time_steps, write_outputs  # noqa: E402


def lengths_for(dist: str, step: int, n: int, seed: int, cap: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 7919 + step)
    if dist == "flan":
        raw = torch.exp(math.log(200) + torch.randn(n, generator=gen) * 1.0)
        lo, hi = 8, 2048
    else:
        raw = 600 + 150 * torch.randn(n, generator=gen)
        lo, hi = 200, 1100
    return raw.round().clamp(lo, min(hi, cap)).long().tolist()


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if args.tiny:
        cfg = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
            max_position_embeddings=4096,
        )
    else:
        cfg = LlamaConfig(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
            max_position_embeddings=4096,
        )
    model = LlamaForCausalLM(cfg).to(args.device).train()
    return model, cfg


def run(dist: str, mode: str, args):
    import hf_varlen_patch

    model, cfg = args.builder(args)
    if mode == "packed":
        hf_varlen_patch.apply(model, backend=args.backend, check_inputs=False)
    opt = torch.optim.SGD(model.parameters(), lr=1e-5)
    cap = 128 if args.tiny else 2048
    params = sum(p.numel() for p in model.parameters())

    def step(i: int) -> float:
        lengths = lengths_for(dist, i, args.batch, args.seed, cap)
        seqs = [torch.randint(0, cfg.vocab_size, (n,)) for n in lengths]
        if mode == "padded":
            width = max(lengths)
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = s
                mask[r, : len(s)] = 1
            batch = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        else:
            ids = torch.cat(seqs)[None]
            pos = torch.cat([torch.arange(n) for n in lengths])[None]
            batch = dict(input_ids=ids, position_ids=pos, labels=ids.clone())
        batch = {k: v.to(args.device) for k, v in batch.items()}
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(sum(lengths))

    label = f"{dist}: {'padded to longest, SDPA' if mode == 'padded' else 'packed + apply(' + args.backend + ')'}"
    result = time_steps(step, steps=args.steps, warmup=args.warmup, row=label, note=f"{params / 1e9:.2f}B params")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main(
    *,
    builder=build,
    name: str = "llama_padding_vs_packing",
    title: str = "Llama-style 0.85B: padding vs packing",
    extra_meta: dict | None = None,
    description: str = __doc__,
) -> None:
    """Padded vs packed for the model ``builder(args)`` returns (bench_hybrid.py passes its own)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    args.builder = builder

    import transformers

    results = []
    for dist in args.dists.split(","):
        for mode in ("padded", "packed"):
            print(f"running {dist} {mode} ...", flush=True)
            results.append(run(dist, mode, args))
            r = results[-1]
            print(f"  {r.median_ms:.1f} ms/step, {r.tokens_per_s:,.0f} tok/s, {r.peak_gb:.1f} GB", flush=True)
    meta = dict(
        device=device_name(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        backend=args.backend,
        **(extra_meta or {}),
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
    )
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
