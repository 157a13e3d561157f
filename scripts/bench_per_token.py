"""Time per real token from a GPT-2 bench JSON, recomputed from its per-step times.

``bench_gpt2.py`` runs every packed row on the same per-step lengths, which differ from step to
step, and the dense oracle on one fixed (32, L) batch, L the run's mean length (its warm-up steps
included). Medians of the two do not compare: a packed median is that of steps of other sizes
than the oracle's (the GPT-2 runs' timed steps averaged 3% fewer tokens than the oracle's batch).
This re-derives, for a JSON written before the bench reported it itself, every row's milliseconds
per 1000 real tokens over all its timed steps and its ratio to the oracle of the same mode.

Usage: python scripts/bench_per_token.py benchmarks/gpt2_kernels_h200.json [--compile-warmup 3]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_gpt2 import make_lengths  # noqa: E402


def step_tokens(row: str, meta: dict, compile_warmup: int) -> list[float]:
    """The real tokens of each timed step of ``row``, as the bench built them."""
    compiled = "compiled" in row
    first = meta["warmup"] + (compile_warmup if compiled else 0)
    steps = range(first, first + meta["steps"])
    lengths = [make_lengths(i, meta["batch"], meta["max_len"], meta.get("seed", 0)) for i in steps]
    if row.startswith("d)"):
        return [float(meta["batch"] * meta["oracle_len"])] * len(lengths)
    if row.startswith("d')"):
        return [float(meta["batch"] * max(1, round(sum(n) / len(n)))) for n in lengths]
    return [float(sum(n)) for n in lengths]


def per_token(path: str | Path, compile_warmup: int = 3) -> list[tuple[str, float, float | None]]:
    """(row, ms per 1k real tokens, ratio to the fixed oracle of the same mode) for every row that ran."""
    data = json.loads(Path(path).read_text())
    meta, out = data["meta"], []
    for r in data["results"]:
        if not r.get("all_ms"):
            continue
        tokens = r.get("all_tokens") or step_tokens(r["row"], meta, compile_warmup)
        if r["row"].startswith("d)"):  # older JSONs recorded the packing's tokens for the oracle too
            tokens = step_tokens(r["row"], meta, compile_warmup)
        out.append((r["row"], sum(r["all_ms"]) / sum(tokens) * 1e3))
    oracles = {("compiled" in row): ms for row, ms in out if row.startswith("d)")}
    return [(row, ms, ms / oracles[("compiled" in row)] if ("compiled" in row) in oracles else None) for row, ms in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+")
    parser.add_argument("--compile-warmup", type=int, default=3, help="the bench's --compile-warmup (default 3)")
    args = parser.parse_args()
    for path in args.json:
        print(f"{path}:\n| row | ms per 1k real tokens | vs the oracle of its mode |\n| --- | --- | --- |")
        for row, ms, ratio in per_token(path, args.compile_warmup):
            print(f"| {row} | {ms:.2f} | {'-' if ratio is None else f'{ratio:.3f}x'} |")


if __name__ == "__main__":
    main()
