"""Per-forward overhead of packing: host-device syncs and the time spent building boundaries.

Counts the syncs PyTorch reports (``torch.cuda.set_sync_debug_mode("warn")``) during one whole
packed forward of a patched model, for boundaries from position_ids and from the collator's
cu_seq_lens kwargs (with and without input checks), next to upstream's packed SDPA forward;
and times Boundaries construction alone (median of 200).

    python scripts/bench_overhead.py --out benchmarks
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

SHOW_STACKS = False


def count_syncs(fn) -> tuple[int, int]:
    """Host-device synchronisations while ``fn`` runs, counted two ways.

    (a) CUDA runtime calls that block the host (cudaStreamSynchronize, cudaDeviceSynchronize,
    cudaEventSynchronize, synchronous cudaMemcpy) in a profiler trace; (b) what PyTorch's sync
    debug mode reports (a prototype that misses some, e.g. plain device-to-host copies).
    """
    from torch.profiler import ProfilerActivity, profile

    blocking = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=SHOW_STACKS) as prof:
        fn()
    hits = [e for e in prof.events() if e.name in blocking]
    traced = len(hits)
    if SHOW_STACKS:
        ops = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU and e.name not in blocking]
        for e in hits:
            start, end = e.time_range.start, e.time_range.end
            enclosing = [o for o in ops if o.time_range.start <= start and o.time_range.end >= end]
            names = [o.name for o in sorted(enclosing, key=lambda o: o.time_range.start)]
            print(f"  blocking {e.name} inside: {' > '.join(names[-6:]) or '(no enclosing op)'}")
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return traced, sum("synchroniz" in str(w.message) for w in caught)


def median_us(fn, n: int = 200) -> float:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=1023)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--out", default="benchmarks")
    parser.add_argument("--stacks", action="store_true", help="print where each blocking call comes from")
    args = parser.parse_args()
    global SHOW_STACKS
    SHOW_STACKS = args.stacks

    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    import hf_varlen_patch
    from hf_varlen_patch import Boundaries

    device = "cuda"
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, args.max_len + 1, (args.sequences,), generator=gen)
    total = int(lengths.sum())
    pos = torch.cat([torch.arange(int(n)) for n in lengths])[None].to(device)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32).to(device)
    max_len = int(lengths.max())
    ids = torch.randint(0, 1024, (1, total), device=device)

    cfg = GPT2Config(n_layer=24, n_embd=1024, n_head=16, vocab_size=1024, n_positions=1024)
    model = GPT2LMHeadModel(cfg).to(device, torch.bfloat16).eval()
    rows = []

    def forward(m, **kw):
        with torch.no_grad():
            m(input_ids=ids, use_cache=False, **kw)

    # the profiler itself adds blocking calls (a cudaDeviceSynchronize when it stops); count them
    # on an empty region and subtract
    profiler_own = count_syncs(lambda: torch.zeros(1, device=device))[0]

    cu_kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_len, max_length_k=max_len)
    forward(model, position_ids=pos)  # warm-up
    rows.append(("upstream packed SDPA, position_ids", count_syncs(lambda: forward(model, position_ids=pos)), None))
    for check in (True, False):
        hf_varlen_patch.apply(model, backend=args.backend, check_inputs=check)
        forward(model, position_ids=pos)
        forward(model, **cu_kwargs)
        rows.append(
            (f"apply, position_ids (check_inputs={check})", count_syncs(lambda: forward(model, position_ids=pos)), None)
        )
        rows.append(
            (
                f"apply, collator cu_seq_lens (check_inputs={check})",
                count_syncs(lambda: forward(model, **cu_kwargs)),
                None,
            )
        )
        hf_varlen_patch.unapply(model)

    build_pos = median_us(lambda: Boundaries.from_position_ids(pos))
    build_cu = median_us(lambda: Boundaries.from_cu_seqlens(cu, max_len, shape=(1, total), check=False))
    build_cu_checked = median_us(lambda: Boundaries.from_cu_seqlens(cu, max_len, shape=(1, total), check=True))
    hf_varlen_patch.apply(model, backend=args.backend)
    fwd_ms = median_us(lambda: forward(model, position_ids=pos), n=20) / 1e3

    lines = [
        "### Packing overhead per forward",
        "",
        f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; transformers {transformers.__version__}; "
        f"GPT-2 24x1024, {args.sequences} sequences, {total} tokens in one row, bf16, backend {args.backend}",
        "",
        "| forward (24 layers) | blocking CUDA calls in a profiler trace | syncs reported by sync-debug mode |",
        "| --- | --- | --- |",
        *[f"| {name} | {syncs[0] - profiler_own} | {syncs[1]} |" for name, syncs, _ in rows],
        "",
        f"(profiler's own blocking calls, subtracted above: {profiler_own})",
        "",
        "| building boundaries | median us |",
        "| --- | --- |",
        f"| from position_ids (one device-to-host copy) | {build_pos:.0f} |",
        f"| from cu_seq_lens, check=False | {build_cu:.0f} |",
        f"| from cu_seq_lens, check=True | {build_cu_checked:.0f} |",
        f"| (for scale: one whole patched forward, ms) | {fwd_ms:.1f} |",
    ]
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.md").write_text(table + "\n")
    (out / "overhead.json").write_text(
        json.dumps(
            {
                "syncs": {name: [syncs[0] - profiler_own, syncs[1]] for name, syncs, _ in rows},
                "profiler_own": profiler_own,
                "build_us": {"position_ids": build_pos, "cu_seqlens": build_cu, "cu_seqlens_checked": build_cu_checked},
                "forward_ms": fwd_ms,
                "tokens": total,
                "device": torch.cuda.get_device_name(0),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
