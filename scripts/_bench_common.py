"""Shared pieces of the benchmark scripts: timing, memory, compile counters, table/JSON/PNG output."""

from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class Result:
    row: str
    median_ms: float
    peak_gb: float
    steps: int
    tokens_per_step: float = 0.0
    tokens_per_s: float = 0.0
    recompiles_after_warmup: int | None = None
    note: str = ""
    all_ms: list[float] = field(default_factory=list)
    #: median time until the step's work was issued (its Python returned), before waiting for the
    #: GPU: close to median_ms means the step is bound by the host, not the GPU
    host_ms: float = 0.0
    #: every timed step's real tokens: packed steps differ in size (a fixed oracle does not), so
    #: rows compare by time per token over all steps, not by median step time
    all_tokens: list[float] = field(default_factory=list)
    #: the whole timed run's milliseconds per 1000 real tokens (sum of times / sum of tokens)
    ms_per_ktok: float = float("nan")
    #: the GPU's SM clock (MHz) after each timed step, where NVML is readable: a throttled clock
    #: shows here, not as host time
    all_sm_mhz: list[int] = field(default_factory=list)


def failed_result(row: str, reason: str) -> Result:
    """A row that could not run (out of memory, an implementation error): reported, not dropped."""
    return Result(row=row, median_ms=float("nan"), peak_gb=float("nan"), steps=0, note=f"FAILED: {reason}")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def graphs_compiled() -> int:
    """How many graphs dynamo has compiled so far (grows by one per (re)compilation)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def time_steps(
    step: Callable[[int], float],
    *,
    steps: int,
    warmup: int,
    row: str,
    compiled: bool = False,
    note: str = "",
    warm_timed: bool = False,
) -> Result:
    """Run warm-up then timed steps; ``step(i)`` runs batch ``i`` and returns its real-token count.

    ``warm_timed`` also runs each timed batch once, untimed, before timing: Triton kernels compile
    per shape class (integer arguments specialise on divisibility by 16), so a handful of fresh
    packed lengths would otherwise time a compile instead of the steady state."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps if warm_timed else warmup):
        step(i)
    sync()
    graphs_before = graphs_compiled() if compiled else None
    times, tokens, issued, clocks = [], [], [], []
    for i in range(warmup, warmup + steps):
        sync()
        t0 = time.perf_counter()
        tokens.append(step(i))
        issued.append((time.perf_counter() - t0) * 1e3)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
        clock = sm_clock_mhz()
        if clock is not None:
            clocks.append(clock)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return Result(
        row=row,
        median_ms=statistics.median(times),
        peak_gb=peak,
        steps=steps,
        tokens_per_step=statistics.mean(tokens),
        tokens_per_s=sum(tokens) / (sum(times) / 1e3),
        recompiles_after_warmup=None if graphs_before is None else graphs_compiled() - graphs_before,
        note=note,
        all_ms=times,
        host_ms=statistics.median(issued),
        all_tokens=tokens,
        ms_per_ktok=sum(times) / sum(tokens) * 1e3,
        all_sm_mhz=clocks,
    )


def sm_clock_mhz() -> int | None:
    """The GPU's current SM clock through NVML (None without a GPU or NVML)."""
    if not torch.cuda.is_available():
        return None
    try:
        return int(torch.cuda.clock_rate())
    except Exception:  # no pynvml / amdsmi in the image: the clock is simply not reported
        return None


#: kernel families for ``kernel_breakdown``, first match wins (CUDA kernel names, any backend)
KERNEL_FAMILIES = (
    ("attention", re.compile(r"flash|fmha|attn|attention|varlen|scaled_dot_product|Sm\d+(Fwd|Bwd)", re.I)),
    ("gemm", re.compile(r"gemm|xmma|nvjet|cublas|cutlass|splitK|aten::(mm|addmm|bmm)$", re.I)),
    ("norm", re.compile(r"layer_?norm|rms_?norm", re.I)),
    ("loss/softmax", re.compile(r"cross_entropy|log_softmax|nll_loss|softmax", re.I)),
    ("copy/index", re.compile(r"copy|cat|index|gather|scatter|fill|arange|cumsum|embedding", re.I)),
    ("elementwise/reduce", re.compile(r"elementwise|vectorized|reduce|unrolled|triton", re.I)),
)


def kernel_breakdown(prof, top: int = 12) -> dict:
    """GPU time of one profiled step by kernel family, plus its ``top`` kernels (ms).

    Comparing rows family by family says where a gap between two rows lies: in the attention
    kernels, in extra copies the patch adds, or in GPU idle time the host leaves (wall - busy).
    """
    on_gpu = torch.cuda.is_available()  # on CPU (a smoke test) the ops' own CPU time stands in

    def own_ms(e) -> float:
        return (e.self_device_time_total if on_gpu else e.self_cpu_time_total) / 1e3

    device = "CUDA" if on_gpu else "CPU"
    # a record_function range (the bench's step::* phases) shows on the GPU timeline too: not a kernel
    kernels = [
        e
        for e in prof.key_averages()
        if str(e.device_type).endswith(device)
        and own_ms(e) > 0
        and not getattr(e, "is_user_annotation", False)
        and not e.key.startswith("step::")
    ]
    families: dict[str, float] = {name: 0.0 for name, _ in KERNEL_FAMILIES}
    families["other"] = 0.0
    for e in kernels:
        name = next((fam for fam, pat in KERNEL_FAMILIES if pat.search(e.key)), "other")
        families[name] += own_ms(e)
    heaviest = sorted(kernels, key=lambda e: -own_ms(e))[:top]
    return dict(
        busy_ms=sum(families.values()),
        families=families,
        top=[(e.key[:90], e.count, own_ms(e)) for e in heaviest],
    )


def profile_step(step: Callable[[int], float], index: int, *, wall_ms: float, trace: Path, top: int = 12) -> dict:
    """Profile ``step(index)`` once: its GPU time by kernel family (:func:`kernel_breakdown`) and,
    on a GPU, its idle gaps, each blamed on the host op that launched the next kernel
    (``scripts/trace_gaps.py``; the chrome trace is written to ``trace``). Prints both."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        step(index)
        sync()
    breakdown = kernel_breakdown(prof, top=top)
    breakdown["wall_ms"] = wall_ms
    if torch.cuda.is_available():
        import trace_gaps

        trace.parent.mkdir(parents=True, exist_ok=True)
        try:
            prof.export_chrome_trace(str(trace))
            breakdown["gaps"] = trace_gaps.report(trace_gaps.gaps(trace_gaps.load(trace)), top=8)
        except Exception as err:  # the timing stands; say why the gaps are missing
            breakdown["gaps"] = f"trace_gaps failed: {type(err).__name__}: {err}"
        print(breakdown["gaps"])
    print(f"--- kernels of one step (GPU busy {breakdown['busy_ms']:.1f} ms of {wall_ms:.1f} ms)")
    for name, count, ms in breakdown["top"]:
        print(f"  {ms:8.2f} ms  x{count:<5d} {name}")
    return breakdown


def breakdown_table(breakdowns: dict[str, dict]) -> str:
    """Rows side by side: one column per benchmark row, one line per kernel family (ms per step)."""
    rows = list(breakdowns)
    fams = list(next(iter(breakdowns.values()))["families"]) if breakdowns else []
    lines = ["| kernel family (GPU ms, one step) | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for fam in [*fams, "busy (sum)", "step wall"]:
        cells = []
        for r in rows:
            b = breakdowns[r]
            value = {"busy (sum)": b["busy_ms"], "step wall": b.get("wall_ms", float("nan"))}.get(fam)
            cells.append(f"{b['families'][fam] if value is None else value:.1f}")
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return "cpu"


def write_outputs(results: list[Result], out: Path, name: str, title: str, meta: dict, baseline: str) -> str:
    """Print and save a markdown table (with ratios to ``baseline``), JSON and a PNG bar chart."""
    out.mkdir(parents=True, exist_ok=True)
    ran = [r for r in results if not r.note.startswith("FAILED")] or results
    base = next((r for r in ran if r.row == baseline), ran[0])
    lines = [
        f"### {title}",
        "",
        f"device: {meta.get('device')}; torch {meta.get('torch')}; transformers {meta.get('transformers')}",
        "",
        "| row | median ms/step | ms per 1k tokens | speed-up vs " + base.row + " (tokens/s) | tokens/s "
        "| peak GB | host ms (issue) | recompiles after warm-up | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        if r.note.startswith("FAILED"):
            lines.append(f"| {r.row} | {r.note} | | | | | | | |")
            continue
        rec = "-" if r.recompiles_after_warmup is None else str(r.recompiles_after_warmup)
        lines.append(
            f"| {r.row} | {r.median_ms:.1f} | {r.ms_per_ktok:.2f} | {r.tokens_per_s / base.tokens_per_s:.2f}x | "
            f"{r.tokens_per_s:,.0f} | {r.peak_gb:.1f} | {r.host_ms:.1f} | {rec} | {r.note} |"
        )
    lines += [
        "",
        "Speed-up and tokens/s are over every timed step (sum of real tokens / sum of times): packed "
        "steps differ in size from step to step, a fixed-shape row does not, so their medians do not compare.",
    ]
    clocks = [c for r in ran for c in r.all_sm_mhz]
    if clocks:
        lines.append(f"SM clock after each timed step: {min(clocks)}-{max(clocks)} MHz over the run.")
    table = "\n".join(lines)
    print(table, flush=True)
    (out / f"{name}.md").write_text(table + "\n")
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(results) + 2))
        results = ran
        labels = [r.row for r in results]
        axes[0].barh(labels, [r.median_ms for r in results], color="tab:blue")
        axes[0].set_xlabel("median ms / training step (lower is better)")
        axes[1].barh(labels, [r.peak_gb for r in results], color="tab:orange")
        axes[1].set_xlabel("peak GPU memory, GB")
        axes[1].set_yticks([])
        for ax in axes:
            ax.invert_yaxis()
        fig.suptitle(f"{title} - {meta.get('device')}")
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
    except ImportError:
        print("matplotlib not installed: no PNG")
    return table
