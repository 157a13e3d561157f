"""The published GPT-2 packing experiment, side by side in one run.

GPT2Config(n_layer=24, n_embd=1024, n_head=16, vocab_size=1024), batches of 32 sequences of
uniformly random length 1..1023, bf16 autocast, SGD, median training-step time after warm-up:

  a) padded to 1024, SDPA (eager and torch.compile)
  b) upstream packed: one row, position_ids restarting (DataCollatorWithFlattening layout), SDPA, use_cache=False
  c) packed + hf_varlen_patch.apply(backend), eager and compiled; position_ids or the collator's cu_seq_lens
  d) oracle: the same model on a dense batch of equal-length sequences holding as many real tokens (no mask)

Every row sees the same sequence lengths. Usage (GPU):
    python scripts/bench_gpt2.py --out benchmarks                     # all rows
    python scripts/bench_gpt2.py --rows c_eager,d_eager --steps 5     # a subset
    python scripts/bench_gpt2.py --tiny --device cpu --backend sdpa   # smoke test on CPU
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import device_name, time_steps, write_outputs  # noqa: E402

ROWS = {
    "a_padded_eager": "a) padded to 1024, SDPA, eager",
    "a_padded_compiled": "a) padded to 1024, SDPA, compiled",
    "b_upstream_packed": "b) upstream packed, SDPA, use_cache=False, eager",
    "c_patched_eager": "c) packed + apply, eager (position_ids)",
    "c_patched_cu_eager": "c) packed + apply, eager (collator cu_seq_lens)",
    "c_patched_compiled": "c) packed + apply, compiled (position_ids)",
    "c_patched_cu_compiled": "c) packed + apply, compiled (collator cu_seq_lens)",
    "d_oracle_eager": "d) oracle dense batch, eager",
    "d_oracle_compiled": "d) oracle dense batch, compiled",
}


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


def oracle_batch(lengths, vocab, device):
    per_row = max(1, round(sum(lengths) / len(lengths)))
    ids = torch.randint(0, vocab, (len(lengths), per_row), device=device)
    return dict(input_ids=ids, labels=ids)


def build_model(args, attn: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if args.tiny:
        cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=args.max_len + 1)
    else:
        cfg = GPT2Config(n_layer=24, n_embd=1024, n_head=16, vocab_size=1024, n_positions=1024)
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0
    return GPT2LMHeadModel(cfg).to(args.device).train(), cfg


def run_row(key: str, args) -> object:
    import hf_varlen_patch

    torch._dynamo.reset()
    model, cfg = build_model(args, attn="sdpa")
    if key.startswith("c_"):
        hf_varlen_patch.apply(model, backend=args.backend, check_inputs=False)
    compiled = key.endswith("compiled")
    fn = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    vocab = cfg.vocab_size
    width = args.max_len + 1 if not args.tiny else args.max_len

    def step(i: int) -> float:
        lengths = make_lengths(i, args.batch, args.max_len, args.seed)
        if key.startswith("a_"):
            batch = padded_batch(lengths, width, vocab, args.device)
        elif key.startswith("d_"):
            batch = oracle_batch(lengths, vocab, args.device)
        else:
            batch = packed_batch(lengths, vocab, args.device, cu="_cu_" in key)
        batch["use_cache"] = False  # every row: no KV cache in training
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            loss = fn(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(sum(lengths))

    warmup = args.warmup + (args.compile_warmup if compiled else 0)
    result = time_steps(step, steps=args.steps, warmup=warmup, row=ROWS[key], compiled=compiled)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(warmup + args.steps)
            torch.cuda.synchronize()
        print(f"--- profile of one step: {ROWS[key]}")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.profile))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of " + ", ".join(ROWS))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile-warmup", type=int, default=3, help="extra warm-up steps for compiled rows")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=1023)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model (smoke test)")
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument("--profile", type=int, default=0, help="print the top-N kernels of one extra step per row")
    args = parser.parse_args()
    if args.tiny:
        args.max_len = min(args.max_len, 64)

    import transformers

    results = []
    meta = dict(
        device=device_name(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        backend=args.backend,
        batch=args.batch,
        max_len=args.max_len,
        steps=args.steps,
        warmup=args.warmup,
    )
    for key in args.rows.split(","):
        print(f"running {ROWS[key]} ...", flush=True)
        try:
            results.append(run_row(key, args))
            print(f"  {results[-1].median_ms:.1f} ms, {results[-1].peak_gb:.1f} GB", flush=True)
        except torch.OutOfMemoryError as err:
            print(f"  {key}: out of memory ({err})", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        # written after every row, so a run cut short still leaves its results
        write_outputs(results, Path(args.out), "gpt2_packing", "GPT-2 packing experiment", meta, ROWS["a_padded_eager"])


if __name__ == "__main__":
    main()
