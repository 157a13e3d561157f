"""The published GPT-2 packing experiment, side by side in one run.

GPT2Config(n_layer=24, n_embd=1024, n_head=16, vocab_size=1024), batches of 32 sequences of
uniformly random length 1..1023, bf16 autocast, SGD, median training-step time after warm-up:

  a) padded to 1024, SDPA (eager and torch.compile)
  b) upstream packed: one row, position_ids restarting (DataCollatorWithFlattening layout), SDPA, use_cache=False
  b) upstream packed with attn_implementation="flash_attention_4" / "flash_attention_2" (where
     transformers and the kernel are installed; a failure is reported as the row's result)
  c) packed + hf_varlen_patch.apply(backend) for each of ``--backends``, eager and compiled;
     position_ids, or the collator's cu_seq_lens (no host read: one graph under torch.compile)
  d) the dense oracle: the same model on a (32, L) batch of real tokens, no padding, no mask, with L
     the mean sequence length over the run's steps (about as many tokens as the packed rows), the
     same L every step. ``d_oracle_varlen_*`` is the oracle as first built, L = that step's mean
     length, a new shape every step: it measures what a new shape per step costs a dense model.

Every row sees the same sequence lengths. Usage (GPU):
    python scripts/bench_gpt2.py --out benchmarks                     # all rows
    python scripts/bench_gpt2.py --rows c_torch_eager,d_oracle_eager --steps 5     # a subset
    python scripts/bench_gpt2.py --tiny --device cpu --backends sdpa   # smoke test on CPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import (  # noqa: E402
    breakdown_table,
    device_name,
    failed_result,
    profile_step,
    time_steps,
    write_outputs,
)

BASE_ROWS = {
    "a_padded_eager": "a) padded to 1024, SDPA, eager",
    "a_padded_compiled": "a) padded to 1024, SDPA, compiled",
    "b_upstream_packed": "b) upstream packed, SDPA, use_cache=False, eager",
    "b_upstream_fa4": "b) upstream packed, attn_implementation=flash_attention_4, eager",
    "b_upstream_fa2": "b) upstream packed, attn_implementation=flash_attention_2, eager",
}
#: the upstream rows' attention implementation
UPSTREAM_ATTN = {"b_upstream_fa4": "flash_attention_4", "b_upstream_fa2": "flash_attention_2"}
ORACLE_ROWS = {
    "d_oracle_eager": "d) dense oracle (32 x mean length, fixed), eager",
    "d_oracle_compiled": "d) dense oracle (32 x mean length, fixed), compiled",
    "d_oracle_varlen_eager": "d') dense oracle, a new length every step, eager",
    "d_oracle_varlen_compiled": "d') dense oracle, a new length every step, compiled",
}


def packed_rows(backends: list[str]) -> dict[str, str]:
    rows = {}
    for backend in backends:
        for mode in ("eager", "compiled"):
            rows[f"c_{backend}_{mode}"] = f"c) packed + apply[{backend}], {mode} (position_ids)"
            rows[f"c_{backend}_cu_{mode}"] = f"c) packed + apply[{backend}], {mode} (collator cu_seq_lens)"
    return rows


def make_lengths(step: int, batch: int, max_len: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 100_003 + step)
    return torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()


def padded_batch(lengths, width, vocab, device):
    ids = torch.randint(0, vocab, (len(lengths), width), device=device)
    mask = torch.zeros(len(lengths), width, dtype=torch.long, device=device)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def packed_batch(lengths, vocab, device, cu: bool):
    """The DataCollatorWithFlattening layout: one row, restarting positions, -100 at each start."""
    total = sum(lengths)
    ids = torch.randint(0, vocab, (1, total), device=device)
    pos = torch.cat([torch.arange(n) for n in lengths]).to(device)[None]
    labels = ids.clone()
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()], device=device)
    labels[0, starts] = -100
    batch = dict(input_ids=ids, position_ids=pos, labels=labels)
    if cu:
        cu_lens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        batch.update(cu_seq_lens_q=cu_lens, cu_seq_lens_k=cu_lens, max_length_q=max(lengths), max_length_k=max(lengths))
        del batch["position_ids"]
    return batch


def oracle_batch(rows: int, per_row: int, vocab, device):
    ids = torch.randint(0, vocab, (rows, per_row), device=device)
    return dict(input_ids=ids, labels=ids)


def oracle_length(args) -> int:
    """The mean sequence length over every step the run takes (warm-up and timed)."""
    steps = args.warmup + args.compile_warmup + args.steps + 1
    total = sum(sum(make_lengths(i, args.batch, args.max_len, args.seed)) for i in range(steps))
    return max(1, round(total / (steps * args.batch)))


def build_model(args, attn: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if args.tiny:
        cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=args.max_len + 1)
    else:
        cfg = GPT2Config(n_layer=24, n_embd=1024, n_head=16, vocab_size=1024, n_positions=1024)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation=attn)
    return model.to(args.device).train(), cfg


def row_backend(key: str, args) -> str | None:
    """The apply backend of a ``c_<backend>[_cu]_<mode>`` row."""
    for backend in args.backends:
        if key.startswith(f"c_{backend}_"):
            return backend
    return None


def run_row(key: str, args) -> object:
    import hf_varlen_patch

    torch._dynamo.reset()
    model, cfg = build_model(args, attn=UPSTREAM_ATTN.get(key, "sdpa"))
    if key.startswith("c_"):
        hf_varlen_patch.apply(model, backend=row_backend(key, args), check_inputs=False)
    compiled = key.endswith("compiled")
    fn = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    vocab = cfg.vocab_size
    width = args.max_len + 1 if not args.tiny else args.max_len

    def step(i: int) -> float:
        lengths = make_lengths(i, args.batch, args.max_len, args.seed)
        if key.startswith("a_"):
            batch = padded_batch(lengths, width, vocab, args.device)
        elif key.startswith("d_oracle_varlen"):
            batch = oracle_batch(args.batch, max(1, round(sum(lengths) / len(lengths))), vocab, args.device)
        elif key.startswith("d_"):
            batch = oracle_batch(args.batch, args.oracle_len, vocab, args.device)
        else:
            batch = packed_batch(lengths, vocab, args.device, cu="_cu_" in key)
        batch["use_cache"] = False  # every row: no KV cache in training
        # phases named for scripts/trace_gaps.py (about a microsecond each outside a profiler, every row alike)
        with (
            record_function("step::forward"),
            torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"),
        ):
            loss = fn(**batch).loss
        with record_function("step::backward"):
            loss.backward()
        with record_function("step::optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        # the real tokens this step trained on (an oracle's batch is its own size, not the packing's)
        return float(batch["input_ids"].numel()) if key.startswith("d_") else float(sum(lengths))

    warmup = args.warmup + (args.compile_warmup if compiled else 0)
    result = time_steps(step, steps=args.steps, warmup=warmup, row=args.rows_all[key], compiled=compiled)
    if args.profile or args.breakdown:
        print(f"=== {args.rows_all[key]}")
        args.breakdowns[key] = profile_step(
            step, warmup + args.steps, wall_ms=result.median_ms, trace=Path(args.out) / f"trace_{key}.json.gz",
            top=args.profile or 12,
        )  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="", help="comma-separated subset of the rows (default: all); see --list")
    parser.add_argument("--list", action="store_true", help="print the row keys and exit")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile-warmup", type=int, default=3, help="extra warm-up steps for compiled rows")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=1023)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backends", default="torch", help="comma-separated apply backends for the c) rows")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke test)")
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument("--profile", type=int, default=0, help="print the top-N kernels of one extra step per row")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="profile one extra step per row and write the rows' GPU time by kernel family side by side "
        "(gpt2_kernels.md): where a gap between two rows lies",
    )
    args = parser.parse_args()
    if args.tiny:
        args.max_len = min(args.max_len, 64)
    args.backends = args.backends.split(",")
    args.rows_all = {**BASE_ROWS, **packed_rows(args.backends), **ORACLE_ROWS}
    if args.list:
        print("\n".join(f"{k}: {v}" for k, v in args.rows_all.items()))
        return
    args.oracle_len = oracle_length(args)
    args.breakdowns = {}

    import transformers

    results = []
    meta = dict(
        device=device_name(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        backends=args.backends,
        oracle_len=args.oracle_len,
        batch=args.batch,
        max_len=args.max_len,
        steps=args.steps,
        warmup=args.warmup,
    )
    for key in args.rows.split(",") if args.rows else list(args.rows_all):
        print(f"running {args.rows_all[key]} ...", flush=True)
        try:
            results.append(run_row(key, args))
            print(f"  {results[-1].median_ms:.1f} ms, {results[-1].peak_gb:.1f} GB", flush=True)
        except Exception as err:  # out of memory, or an implementation that fails: a measured result
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
            print(f"  {key}: FAILED {reason}", flush=True)
            results.append(failed_result(args.rows_all[key], reason))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        # written after every row, so a run cut short still leaves its results
        write_outputs(
            results, Path(args.out), "gpt2_packing", "GPT-2 packing experiment", meta, BASE_ROWS["a_padded_eager"]
        )
    if args.breakdowns:
        table = breakdown_table({args.rows_all[k].split(",")[0] + f" [{k}]": b for k, b in args.breakdowns.items()})
        tops = "\n\n".join(
            f"{args.rows_all[k]}:\n" + "\n".join(f"    {ms:8.2f} ms  x{n:<5d} {name}" for name, n, ms in b["top"])
            for k, b in args.breakdowns.items()
        )
        gaps = "\n\n".join(f"{args.rows_all[k]}:\n{b['gaps']}" for k, b in args.breakdowns.items() if "gaps" in b)
        text = f"### GPT-2 step, GPU time by kernel family\n\ndevice: {meta['device']}\n\n{table}\n\n```\n{tops}\n```\n"
        if gaps:
            text += f"\n### Where the GPU waits (scripts/trace_gaps.py)\n\n```\n{gaps}\n```\n"
        (Path(args.out) / "gpt2_kernels.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
