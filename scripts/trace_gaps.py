"""Where a GPU waits on the host: the idle gaps in a profiler (kineto) chrome trace, each blamed
on the host work that launched the kernel after it.

A step can have the same kernels as another and still be slower, if the GPU sits idle between
them (the GPT-2 bench's packed eager rows: their kernels sum to the oracle's, their wall time does
not). For every gap of at least ``--min-us`` between GPU activities, this finds the next kernel's
launch call (by the trace's correlation id), the CPU op that made it (innermost ``cpu_op`` around
the launch) and the step phase around it (a ``record_function`` such as ``step::backward``), and
sums the idle time by phase and by op.

Usage: python scripts/trace_gaps.py TRACE.json[.gz] [--min-us 20] [--top 12]
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from pathlib import Path

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
LAUNCH_CATS = {"cuda_runtime", "cuda_driver"}
HOST_CATS = {"cpu_op", "user_annotation"}
#: the record_function names that mark a step's phases
PHASE_PREFIX = "step::"


def load(path: str | Path) -> list[dict]:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return json.load(f)["traceEvents"]


def _enclosing(ops: list[dict], starts: list[float], ts: float) -> list[dict]:
    """The ops of one thread whose interval holds ``ts``, outermost first."""
    hits = []
    for op in ops[: bisect.bisect_right(starts, ts)]:
        if op["ts"] <= ts <= op["ts"] + op.get("dur", 0):
            hits.append(op)
    return hits


def gaps(events: list[dict], min_us: float = 20.0) -> dict:
    """GPU busy and idle time over the trace, and each idle gap with the host work it waited on."""
    gpu = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    if not gpu:
        return dict(busy_us=0.0, idle_us=0.0, gaps=[], by_phase={}, by_op={})
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})
    }
    host: dict[int, list[dict]] = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in HOST_CATS:
            host[e["tid"]].append(e)
    for ops in host.values():
        ops.sort(key=lambda e: e["ts"])
    starts = {tid: [op["ts"] for op in ops] for tid, ops in host.items()}
    # the step's own phases (bench_gpt2's step::*), not torch's annotations such as Optimizer.step
    phases = [e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith(PHASE_PREFIX)]

    busy, found = 0.0, []
    end = gpu[0]["ts"]
    span_start = gpu[0]["ts"]
    for e in gpu:
        if e["ts"] - end >= min_us:
            launch = launches.get(e.get("args", {}).get("correlation"))
            stack = _enclosing(host[launch["tid"]], starts[launch["tid"]], launch["ts"]) if launch else []
            # the phase by time, on any thread: autograd launches the backward from its own thread
            at = launch["ts"] if launch else e["ts"]
            phase = next((a["name"] for a in phases if a["ts"] <= at <= a["ts"] + a.get("dur", 0)), "(none)")
            ops = [op["name"] for op in stack if op.get("cat") == "cpu_op"]
            found.append(
                dict(
                    idle_us=e["ts"] - end,
                    at_ms=(end - span_start) / 1e3,
                    next_kernel=e["name"][:80],
                    phase=phase,
                    op=ops[-1] if ops else "(no cpu op)",
                    outer_op=ops[0] if ops else "(no cpu op)",
                )
            )
        busy += max(0.0, e["ts"] + e.get("dur", 0) - max(end, e["ts"]))
        end = max(end, e["ts"] + e.get("dur", 0))
    by_phase: dict[str, float] = defaultdict(float)
    by_op: dict[str, float] = defaultdict(float)
    for g in found:
        by_phase[g["phase"]] += g["idle_us"]
        by_op[g["op"]] += g["idle_us"]
    return dict(
        busy_us=busy,
        idle_us=end - span_start - busy,
        gaps=found,
        by_phase=dict(sorted(by_phase.items(), key=lambda kv: -kv[1])),
        by_op=dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
    )


def report(result: dict, top: int = 12) -> str:
    """The idle time by phase and by launching op, then the longest gaps, as text."""
    lines = [
        f"GPU busy {result['busy_us'] / 1e3:.1f} ms, idle {result['idle_us'] / 1e3:.1f} ms between its first and "
        f"last kernel ({len(result['gaps'])} gaps counted)"
    ]
    lines.append("idle by phase: " + ", ".join(f"{k} {v / 1e3:.2f} ms" for k, v in result["by_phase"].items()))
    lines.append("idle by the op that launched the next kernel:")
    lines += [f"  {v / 1e3:7.2f} ms  {k}" for k, v in list(result["by_op"].items())[:top]]
    lines.append("longest gaps:")
    for g in sorted(result["gaps"], key=lambda g: -g["idle_us"])[:top]:
        lines.append(
            f"  {g['idle_us'] / 1e3:6.2f} ms at {g['at_ms']:7.1f} ms  {g['phase']}  {g['outer_op']} > {g['op']}"
            f"  -> {g['next_kernel']}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace")
    parser.add_argument("--min-us", type=float, default=20.0)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    print(report(gaps(load(args.trace), args.min_us), args.top))


if __name__ == "__main__":
    main()
