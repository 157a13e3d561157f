"""Padding vs packing on a Llama-style ~0.85B model (GQA, random weights, bf16 autocast).

Two synthetic length distributions, shaped like the published experiments:
  FLAN-like     short and widely varying: lognormal, median 200 tokens, sigma 1.0, clipped to [8, 2048]
  OrcaMath-like longer and narrow:        normal, mean 600, sd 150, clipped to [200, 1100]
Each step trains on the same 8 sequences, in one of these modes (``--modes``):
  padded    padded to the batch's longest, SDPA with an attention_mask (upstream)
  upstream  packed into one row with restarting position_ids, unpatched (upstream's own packing)
  packed    packed into one row after hf_varlen_patch.apply, once per ``--backends`` entry
  oracle    a dense (8, L) batch, no padding, no mask, L the run's mean length (the same every step)
Reports tokens/s (real tokens), peak memory and host time, as a table + JSON + PNG. One model is
built per run and patched/unpatched between rows. ``--repeats N`` runs every row N times,
interleaved, and reports the median of the medians with their spread. ``--compile packed`` runs the
packed rows under torch.compile (inductor), fed the collator's ``cu_seq_lens`` as well.

``--shape 8b``: Llama-3-8B-shaped (32 layers, 4096 wide, GQA 32/8, vocab 128256), random bf16
weights, only q_proj/v_proj trainable in every layer, gradient checkpointing (non-reentrant): how
people fine-tune at that size on one GPU.

    python scripts/bench_llama.py --out benchmarks
    python scripts/bench_llama.py --shape 8b --dists flan --modes padded,upstream,packed,oracle \
        --backends torch,flash_attn --repeats 3
    python scripts/bench_llama.py --tiny --device cpu --backends sdpa     # smoke test
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import device_name, failed_result, profile_step, time_steps, write_outputs  # noqa: E402


def lengths_for(dist: str, step: int, n: int, seed: int, cap: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 7919 + step)
    if dist == "flan":
        raw = torch.exp(math.log(200) + torch.randn(n, generator=gen) * 1.0)
        lo, hi = 8, 2048
    else:
        raw = 600 + 150 * torch.randn(n, generator=gen)
        lo, hi = 200, 1100
    return raw.round().clamp(lo, min(hi, cap)).long().tolist()


SHAPES = {
    "0.85b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}  # fmt: skip


def build(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if args.shape == "8b" and not args.tiny:
        cfg = LlamaConfig(**SHAPES["8b"], max_position_embeddings=8192)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # initialise in bf16 on the device: no fp32 copy
        try:
            with torch.device(args.device):
                model = LlamaForCausalLM(cfg).train()
        finally:
            torch.set_default_dtype(default)
        for name, param in model.named_parameters():
            param.requires_grad_(name.endswith(("q_proj.weight", "v_proj.weight")))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model, cfg
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
        cfg = LlamaConfig(**SHAPES["0.85b"], max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).to(args.device).train()
    return model, cfg


def mean_length(dist: str, args, cap: int) -> int:
    steps = range(args.warmup + args.steps)
    total = sum(sum(lengths_for(dist, i, args.batch, args.seed, cap)) for i in steps)
    return max(1, round(total / (len(steps) * args.batch)))


def compiled_mode(mode: str, args) -> bool:
    """Whether ``--compile`` names this row's mode."""
    return mode in args.compile.split(",")


def row_label(dist: str, mode: str, backend: str | None, compiled: bool = False) -> str:
    return (
        f"{dist}: "
        + {
            "padded": "padded to longest, SDPA",
            "upstream": "upstream packed (position_ids), SDPA",
            "packed": f"packed + apply({backend})",
            "oracle": "dense oracle (8 x mean length)",
        }[mode]
        + (", compiled" if compiled else "")
    )


def run(dist: str, mode: str, args, backend: str | None = None):
    import hf_varlen_patch

    if getattr(args, "model", None) is None:
        args.model, args.cfg = args.builder(args)
    model, cfg = args.model, args.cfg
    if mode == "packed":
        hf_varlen_patch.apply(model, backend=backend, check_inputs=False)
    compiled = compiled_mode(mode, args)
    # dynamic after the first new length (automatic); packed rows carry the collator's cu_seq_lens, which
    # the patch takes without reading position_ids on the host (one graph where the kernels allow)
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    cap = 128 if args.tiny else 2048
    params = sum(p.numel() for p in model.parameters())
    oracle_len = mean_length(dist, args, cap)

    def step(i: int) -> float:
        lengths = lengths_for(dist, i, args.batch, args.seed, cap)
        seqs = [torch.randint(0, cfg.vocab_size, (n,)) for n in lengths]
        if mode == "oracle":
            ids = torch.randint(0, cfg.vocab_size, (args.batch, oracle_len))
            batch = dict(input_ids=ids, labels=ids)
            lengths = [oracle_len] * args.batch
        elif mode == "padded":
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
            if compiled:
                cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
                batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu)
        batch = {k: v.to(args.device) for k, v in batch.items()}
        if compiled and mode == "packed":
            batch.update(max_length_q=max(lengths), max_length_k=max(lengths))
        # phases named for scripts/trace_gaps.py (about a microsecond each outside a profiler)
        with (
            record_function("step::forward"),
            torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"),
        ):
            loss = forward(**batch, use_cache=False).loss
        with record_function("step::backward"):
            loss.backward()
        with record_function("step::optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(sum(lengths))

    label = row_label(dist, mode, backend, compiled)
    try:
        result = time_steps(
            step,
            steps=args.steps,
            warmup=args.warmup,
            row=label,
            compiled=compiled,
            note=f"{params / 1e9:.2f}B params",
            warm_timed=getattr(args, "warm_timed", False),
        )
        if getattr(args, "profile", 0) and mode in args.profile_modes.split(","):
            print(f"=== {label}")
            slug = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")[:60]
            profile_step(step, args.warmup + args.steps, wall_ms=result.median_ms,
                         trace=Path(args.out) / f"trace_{slug}.json.gz", top=args.profile)  # fmt: skip
    except Exception as err:  # out of memory or a failing implementation: a measured result
        result = failed_result(label, f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}")
    finally:
        if mode == "packed":
            hf_varlen_patch.unapply(model)
        opt.zero_grad(set_to_none=True)
        if compiled:
            torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def combine(runs: list) -> object:
    """One row from its repeats: the median of their medians, the spread in the note."""
    ok = [r for r in runs if not r.note.startswith("FAILED")]
    if len(runs) == 1 or not ok:
        return runs[0]
    medians = sorted(r.median_ms for r in ok)
    best = sorted(ok, key=lambda r: r.ms_per_ktok)[len(ok) // 2]
    spread = f"repeats {', '.join(f'{m:.0f}' for m in (r.median_ms for r in runs))} ms"
    hosts = ", ".join(f"{r.host_ms:.0f}" for r in ok)
    return replace(best, note=f"{best.note}; {spread} (spread {medians[-1] / medians[0] - 1:.0%}); host {hosts} ms")


def main(
    *,
    builder=build,
    name: str = "llama_padding_vs_packing",
    title: str = "",
    extra_meta: dict | None = None,
    description: str = __doc__,
    add_arguments=None,
) -> None:
    """Padded vs packed for the model ``builder(args)`` returns (bench_hybrid.py passes its own)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dists", default="flan,orcamath")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", default="padded,packed", help="padded, upstream, packed, oracle")
    parser.add_argument("--backends", default="torch", help="apply backends for the packed rows")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="0.85b")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        help="profile one more step of each row in --profile-modes: top-N kernels, GPU gaps",
    )
    parser.add_argument("--profile-modes", default="padded,packed", help="the modes --profile applies to")
    parser.add_argument(
        "--compile",
        default="",
        help="modes whose model runs under torch.compile (inductor): e.g. packed",
    )
    if add_arguments is not None:  # a caller's own options (bench_hybrid.py: --model)
        add_arguments(parser)
    args = parser.parse_args()
    args.builder = builder
    # a caller may name its outputs after its own options
    name, title, extra_meta = (x(args) if callable(x) else x for x in (name, title, extra_meta))

    import transformers

    rows = [
        (dist, mode, backend)
        for dist in args.dists.split(",")
        for mode in args.modes.split(",")
        for backend in (args.backends.split(",") if mode == "packed" else [None])
    ]
    runs: dict[tuple, list] = {row: [] for row in rows}
    for repeat in range(args.repeats):
        for row in rows:
            label = row_label(*row, compiled_mode(row[1], args))
            print(f"running {label} (repeat {repeat + 1}/{args.repeats}) ...", flush=True)
            r = run(row[0], row[1], args, row[2])
            runs[row].append(r)
            print(f"  {r.median_ms:.1f} ms/step (host {r.host_ms:.1f}), {r.tokens_per_s:,.0f} tok/s, "
                  f"{r.peak_gb:.1f} GB {r.note}", flush=True)  # fmt: skip
    results = [combine(runs[row]) for row in rows]
    meta = dict(
        device=device_name(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        backends=args.backends,
        shape=args.shape,
        repeats=args.repeats,
        **(extra_meta or {}),
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
    )
    if not title:
        size = (
            "tiny"
            if args.tiny
            else {"0.85b": "0.85B", "8b": "Llama-3-8B-shaped, q/v trainable, checkpointed"}[args.shape]
        )
        title = f"Llama-style ({size}): padding vs packing"
    table = write_outputs(results, Path(args.out), name, title, meta, results[0].row)
    ratios = [
        "",
        "| row | tokens/s vs padded | peak memory vs padded | time per token vs dense oracle |",
        "| --- | --- | --- | --- |",
    ]
    by_row = dict(zip(rows, results))
    for (dist, _mode, _backend), r in by_row.items():
        pad, oracle = by_row.get((dist, "padded", None)), by_row.get((dist, "oracle", None))
        if r.note.startswith("FAILED"):
            continue
        tok = f"{r.tokens_per_s / pad.tokens_per_s:.2f}x" if pad and pad.tokens_per_s else "-"
        mem = f"{r.peak_gb / pad.peak_gb:.2f}x" if pad and pad.peak_gb else "-"
        vs_oracle = f"{r.ms_per_ktok / oracle.ms_per_ktok:.2f}x" if oracle and oracle.ms_per_ktok > 0 else "-"
        ratios.append(f"| {r.row} | {tok} | {mem} | {vs_oracle} |")
    print("\n".join(ratios))
    (Path(args.out) / f"{name}.md").write_text(table + "\n" + "\n".join(ratios) + "\n")


if __name__ == "__main__":
    main()
