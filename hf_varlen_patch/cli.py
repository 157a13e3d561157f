"""Command line: ``hf-varlen-patch scan`` (every registered architecture) and ``check`` (one model).

Both build packed batches, run them against per-sequence runs before and after ``apply`` and
print a table; the exit status is non-zero when a patched model is not equivalent.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

import torch

from . import api
from .attention import BACKEND_USAGE
from .errors import VarlenPatchError
from .registry import supported_model_types
from .selfcheck import LAYOUTS
from .testing import compare_packed, make_packed_batch, test_variants, worst_error

#: The upstream measurement (``coverage._upstream``) is ARCHITECTURE.md's: sequences of 5, 9, 3 in one row.
#: The patched check adds a second row and trailing padding (attention_mask) to the above.
PATCHED_LAYOUTS = LAYOUTS


@dataclass
class Row:
    model_type: str
    variant: str
    upstream_no_cache: float
    upstream_default: float
    patched: float
    backend: str
    verdict: str
    note: str = ""


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1e}"


def _build(config, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    from .testing import long_memory

    torch.manual_seed(0)
    return long_memory(AutoModelForCausalLM.from_config(config)).to(device=device, dtype=dtype)


def check_config(
    model_type: str, variant: str, config, *, backend: str, tol: float, dtype: torch.dtype | None, device: str
) -> Row:
    """Upstream and patched packed-vs-separate errors for one tiny config (a refusal first: its
    reason stands even where upstream's own twin does not run)."""
    from .coverage import _upstream
    from .registry import REGISTRY

    entry = REGISTRY.get(model_type)
    reason = entry.refuse(config) if entry is not None and entry.refuse is not None else None
    if dtype is None:  # the entry's own test dtype (float64 where fp32 rounding alone exceeds the tolerance)
        dtype = entry.test_dtype if entry is not None else torch.float32
    nan = float("nan")
    try:
        model = _build(config, dtype, device)
    except Exception:
        if reason:
            return Row(model_type, variant, nan, nan, nan, "-", "REFUSED", reason[:120])
        raise
    if reason:
        try:
            up_nc, up_def = _upstream(model, model.config.vocab_size)
        except Exception:
            up_nc = up_def = nan
        return Row(model_type, variant, up_nc, up_def, nan, "-", "REFUSED", reason[:120])
    up_nc, up_def = _upstream(model, model.config.vocab_size)
    try:
        api.apply(model, backend=backend)
    except VarlenPatchError as err:
        return Row(model_type, variant, up_nc, up_def, nan, "-", "REFUSED", str(err)[:120])
    BACKEND_USAGE.clear()
    errors = [
        compare_packed(
            model, make_packed_batch(vocab_size=model.config.vocab_size, **layout), use_cache=use_cache
        ).max_error
        for layout in PATCHED_LAYOUTS
        for use_cache in (None, False)
    ]
    used = ",".join(sorted(BACKEND_USAGE)) or "upstream"
    patched = worst_error(errors)
    ok = math.isfinite(patched) and patched <= tol
    return Row(model_type, variant, up_nc, up_def, patched, used, "PASS" if ok else "FAIL")


def _print_table(rows: list[Row], tol: float) -> None:
    import transformers

    print(
        f"\nhf_varlen_patch scan - transformers {transformers.__version__}, torch {torch.__version__}; "
        f"errors are max |packed - separate| over logits, loss and gradients (tolerance {tol:g})"
    )
    header = (
        "model_type",
        "variant",
        "upstream(use_cache=False)",
        "upstream(default)",
        "patched",
        "backend",
        "verdict",
    )
    widths = [max(len(h), 12) for h in header]
    widths[0] = max([12] + [len(r.model_type) for r in rows])
    widths[1] = max([16] + [len(r.variant) for r in rows])
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        cells = (
            r.model_type,
            r.variant,
            _fmt(r.upstream_no_cache),
            _fmt(r.upstream_default),
            _fmt(r.patched),
            r.backend,
            r.verdict + (f" ({r.note})" if r.note else ""),
        )
        print("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)))


def _fmt_cell(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1e}"


def scan_all_report(rows, version: str) -> dict:
    """What ``scan --all --json`` writes: the versions, the counts and the rows."""
    return {
        "transformers": version,
        "torch": torch.__version__,
        "counts": dict(Counter(r.verdict for r in rows)),
        "rows": [asdict(r) for r in rows],
    }


def cmd_scan_all(args: argparse.Namespace) -> int:
    import transformers

    from .coverage import scan_all, terminal_progress

    start = time.perf_counter()
    rows = scan_all(args.model_types or None, backend=args.backend, tol=args.tol, progress=terminal_progress())
    report = scan_all_report(rows, transformers.__version__)
    if args.json == "-":
        print(json.dumps(report, indent=1))
    else:
        header = (
            "model_type",
            "kind",
            "upstream(use_cache=False)",
            "upstream(default)",
            "patched",
            "backend",
            "verdict",
        )
        table = [header] + [
            (
                r.model_type,
                r.kind,
                _fmt_cell(r.upstream_no_cache),
                _fmt_cell(r.upstream_default),
                _fmt_cell(r.patched),
                r.backend,
                r.verdict + (f" ({r.reason})" if r.reason else ""),
            )
            for r in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
        print(
            f"hf_varlen_patch scan --all - transformers {transformers.__version__}, torch {torch.__version__}; "
            f"max |packed - separate| over logits, loss and gradients (tolerance {args.tol:g})"
        )
        for row in table:
            print("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1])
        print(f"\n{report['counts']} over {len(rows)} model_types in {time.perf_counter() - start:.0f}s")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=1)
    return 1 if report["counts"].get("FAIL") else 0


def cmd_scan(args: argparse.Namespace) -> int:
    if args.all:
        return cmd_scan_all(args)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    from transformers import CONFIG_MAPPING

    # by default the registered types this release has (an entry may cover types of other releases)
    model_types = args.model_types or [mt for mt in supported_model_types() if mt in CONFIG_MAPPING]
    rows = []
    start = time.perf_counter()
    for model_type in model_types:
        for variant, config in test_variants(model_type).items():
            try:
                rows.append(
                    check_config(
                        model_type, variant, config, backend=args.backend, tol=args.tol, dtype=dtype, device=args.device
                    )
                )
            except Exception as err:  # a crash is a failure of that row, not of the scan
                rows.append(
                    Row(
                        model_type,
                        variant,
                        float("nan"),
                        float("nan"),
                        float("nan"),
                        "-",
                        "ERROR",
                        f"{type(err).__name__}: {err}"[:160],
                    )
                )
    _print_table(rows, args.tol)
    counts = Counter(r.verdict for r in rows)
    print(f"\n{dict(counts)} in {time.perf_counter() - start:.0f}s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in rows], fh, indent=1)
    return 0 if counts.get("PASS", 0) == len(rows) else 1


def cmd_check(args: argparse.Namespace) -> int:
    """One model: a registered model_type's tiny variants, or a local checkpoint directory."""
    import os

    from transformers import AutoConfig

    dtype = getattr(torch, args.dtype) if args.dtype else None
    from .twins import tiny_config

    if os.path.isdir(args.model):
        config = AutoConfig.from_pretrained(args.model)
        configs = {"twin-of-checkpoint": tiny_config(config)}  # same classes and flags, CPU size
        model_type = config.model_type
    else:
        model_type = args.model
        try:
            configs = test_variants(model_type)
        except VarlenPatchError:
            configs = {"twin": tiny_config(model_type)}
    rows = [
        check_config(model_type, variant, config, backend=args.backend, tol=args.tol, dtype=dtype, device=args.device)
        for variant, config in configs.items()
    ]
    _print_table(rows, args.tol)
    return 0 if all(r.verdict == "PASS" for r in rows) else 1


def architecture_table() -> str:
    """The registry as the README's table: one row per family (entry module)."""
    from .registry import REGISTRY

    families: dict[str, list[str]] = {}
    notes: dict[str, str] = {}
    for model_type in supported_model_types():
        entry = REGISTRY[model_type]
        families.setdefault(entry.family, []).append(model_type)
        notes[entry.family] = entry.notes
    lines = ["| entry | model_types | what carries the boundaries |", "| --- | --- | --- |"]
    for family in sorted(families):
        types = ", ".join(f"`{mt}`" for mt in families[family])
        lines.append(f"| `patches/{family}.py` | {types} | {notes[family]} |")
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    print(architecture_table())
    return 0


def cmd_coverage_doc(args: argparse.Namespace) -> int:
    from .coverage_doc import render

    reports = []
    for path in args.reports:
        with open(path) as fh:
            reports.append(json.load(fh))
    text = render(reports)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text)
    else:
        print(text, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-varlen-patch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, helptext in (
        ("scan", "check every registered architecture on tiny random models"),
        ("check", "check one model_type (tiny random) or a local checkpoint directory's config"),
    ):
        p = sub.add_parser(name, help=helptext)
        if name == "scan":
            p.add_argument("model_types", nargs="*", help="restrict to these model_types")
            p.add_argument(
                "--all",
                action="store_true",
                help="every causal-LM model_type of the installed transformers: PASS, FAIL, REFUSED, NO-ENTRY or "
                "UNBUILDABLE",
            )
            p.add_argument(
                "--json", nargs="?", const="-", help="write the rows as JSON to this file ('-' or none: stdout)"
            )
        else:
            p.add_argument("model", help="a model_type or a directory with config.json")
        p.add_argument("--backend", default="auto")
        p.add_argument(
            "--dtype",
            default=None,
            choices=["float32", "float64", "bfloat16", "float16"],
            help="default: the entry's test dtype (float32; float64 for a few, see the README table)",
        )
        p.add_argument("--device", default="cpu")
        p.add_argument("--tol", type=float, default=1e-5)
    sub.add_parser("list", help="print the supported-architecture table (markdown)")
    doc = sub.add_parser("coverage-doc", help="render docs/coverage.md from `scan --all --json` reports")
    doc.add_argument("reports", nargs="+", help="JSON reports, one per transformers release (oldest first)")
    doc.add_argument("--output", "-o", help="write here instead of stdout")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    commands = {"scan": cmd_scan, "check": cmd_check, "list": cmd_list, "coverage-doc": cmd_coverage_doc}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
