"""Command line: ``hf-varlen-patch scan`` (every registered architecture) and ``check`` (one model).

Both build packed batches, run them against per-sequence runs before and after ``apply`` and
print a table. ``check`` takes a model_type (its tiny random variants) or a *local* checkpoint
directory with a config.json (a tiny twin of that config; only the config is read, and nothing is
ever downloaded: a Hub repo id must be downloaded first and its directory passed).

Exit status: 0 when every row PASSes, 1 when some row does not (FAIL, ERROR, REFUSED), 2 on a usage
error (a path that does not exist, a directory without config.json, a config.json that cannot be read
or whose model_type the installed transformers does not know, an unknown model_type, ``--device`` or
``--backend``): then one line ``hf-varlen-patch: error: <what is wrong>; <what to do>`` on stderr and
nothing on stdout. ``--json`` with no file (or ``-``) writes the report to stdout as strict JSON (NaN
becomes null) and the human table to stderr.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import math
import os
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

import torch

from . import api
from .coverage import clip
from .equivalence import build_twin
from .errors import VarlenPatchError
from .registry import supported_model_types
from .testing import test_variants


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


def check_config(
    model_type: str, variant: str, config, *, backend: str, tol: float, dtype: torch.dtype | None, device: str
) -> Row:
    """Upstream and patched packed-vs-separate errors for one tiny config (a refusal first: its
    reason stands even where upstream's own twin does not run). Unlike ``scan --all``'s rows
    (:func:`~hf_varlen_patch.coverage.scan_type`), the model is patched with ``apply`` as a user
    would (an unregistered type after its self-check), in ``dtype`` on ``device``, and a twin that
    does not run is an ERROR."""
    from .coverage import _scan_multimodal, measure_patched, upstream_errors
    from .registry import REGISTRY

    entry = REGISTRY.get(model_type)
    if entry is not None and entry.multimodal is not None:  # a vision-language model: samples with images
        row = _scan_multimodal(model_type, entry, config, backend, tol, device=device, dtype=dtype)
        return Row(model_type, variant, row.upstream_no_cache, row.upstream_default, row.patched, row.backend,
                   row.verdict, clip(row.reason, 120))  # fmt: skip
    reason = entry.refusal(config) if entry is not None else None
    if dtype is None:  # the entry's own test dtype (float64 where fp32 rounding alone exceeds the tolerance)
        dtype = entry.test_dtype if entry is not None else torch.float32
    nan = float("nan")
    try:
        model = build_twin(config, dtype=dtype, device=device)
    except Exception:
        if reason:
            return Row(model_type, variant, nan, nan, nan, "-", "REFUSED", clip(reason, 120))
        raise
    if reason:
        try:
            up_nc, up_def = upstream_errors(model, model.config.vocab_size)
        except Exception:
            up_nc = up_def = nan
        return Row(model_type, variant, up_nc, up_def, nan, "-", "REFUSED", clip(reason, 120))
    up_nc, up_def = upstream_errors(model, model.config.vocab_size)
    try:
        api.apply(model, backend=backend)
    except VarlenPatchError as err:
        return Row(model_type, variant, up_nc, up_def, nan, "-", "REFUSED", clip(str(err), 120))
    patched, used, verdict = measure_patched(model, tol, vocab_size=model.config.vocab_size)
    return Row(model_type, variant, up_nc, up_def, patched, used, verdict)


def _print_table(rows: list[Row], tol: float, *, command: str = "scan", file=None) -> None:
    import transformers

    out = sys.stdout if file is None else file
    print(
        f"\nhf_varlen_patch {command} - transformers {transformers.__version__}, torch {torch.__version__}; "
        f"errors are max |packed - separate| over logits, loss and gradients (tolerance {tol:g})",
        file=out,
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
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)), file=out)
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
        print("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)), file=out)


def _fmt_cell(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1e}"


# ---------------------------------------------------------------------------------------------
# usage errors: one line on stderr, exit status 2, never a traceback and never the network


class _UsageError(Exception):
    """A wrong argument or input; :func:`main` prints ``hf-varlen-patch: error: <message>`` and exits 2.

    The message says what is wrong, then after ``"; "`` what to do."""


USAGE_ERROR = 2


def _known_model_types() -> list[str]:
    """Every model_type the installed transformers has a config class for."""
    from transformers import CONFIG_MAPPING

    return sorted(CONFIG_MAPPING.keys())


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _looks_like_path(text: str) -> bool:
    return "/" in text or os.sep in text or bool(os.altsep and os.altsep in text) or text.startswith((".", "~"))


#: ``org/name`` as the Hub spells a repo id (a relative path of two parts looks the same).
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def _unknown_model_type(name: str, *, or_directory: bool) -> _UsageError:
    """The error for a model_type the installed transformers does not know, with close matches."""
    from .registry import supported_model_types

    version = _transformers_version()
    directory = ", or pass a local checkpoint directory containing config.json" if or_directory else ""
    if name in supported_model_types():  # an entry for another transformers release
        return _UsageError(
            f"model_type {name!r} is not in the installed transformers {version} (hf_varlen_patch patches it on "
            f"other releases); install a transformers release that has it (pip install -U transformers){directory}"
        )
    tail = f"run `hf-varlen-patch list` for the patched model_types{directory}"
    known = _known_model_types()
    matches = difflib.get_close_matches(name.lower(), known, n=5, cutoff=0.6)
    what = f"unknown model_type {name!r} (transformers {version} has no such type"
    what += ", and no such local directory exists)" if or_directory else ")"
    if matches:
        return _UsageError(f"{what}; did you mean {', '.join(matches)}? {tail[0].upper()}{tail[1:]}")
    return _UsageError(f"{what}; {tail}")


def _validate_model_types(names: list[str]) -> None:
    known = set(_known_model_types())
    for name in names:
        if name not in known:
            raise _unknown_model_type(name, or_directory=False)


def _validate_device(device: str) -> str:
    """``device`` when torch can compute on it here, else a usage error (shared by scan and check)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise _UsageError(
            f"invalid --device {device!r}; use cpu, cuda or cuda:N (a torch device string, lower case)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                f"torch {torch.__version__} is built without CUDA"
                if torch.version.cuda is None
                else "no CUDA GPU is visible"
            )
            raise _UsageError(
                f"--device {device!r} but CUDA is not available here ({why}); use --device cpu, or run on a "
                "machine with a CUDA GPU and a CUDA build of torch"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise _UsageError(
                f"--device {device!r} but only {count} CUDA device(s) are visible; use --device cuda:0 to "
                f"cuda:{count - 1} (or check CUDA_VISIBLE_DEVICES)"
            )
        return device
    if dev.type == "meta":
        raise _UsageError(f"--device {device!r} holds no data, so nothing can be compared; use --device cpu or cuda")
    if dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except Exception as err:
            raise _UsageError(
                f"--device {device!r} is not usable with torch {torch.__version__} here ({type(err).__name__}); "
                "use --device cpu or cuda"
            ) from None
    return device


def _validate_backend(backend: str) -> str:
    from .backends import BACKENDS

    if backend == "auto" or backend in BACKENDS:
        return backend
    choices = ["auto", *sorted(BACKENDS)]
    matches = difflib.get_close_matches(backend.lower(), choices, n=1, cutoff=0.5)
    hint = f"did you mean {matches[0]}? Valid: " if matches else "choose one of "
    raise _UsageError(f"unknown --backend {backend!r}; {hint}{', '.join(choices)}")


def _validate_json_target(target: str | None) -> None:
    """A --json FILE whose folder does not exist fails before the run, not after it."""
    if target is None or target == "-":
        return
    path = os.path.expanduser(target)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise _UsageError(f"--json {target!r} is a directory; name a file, or pass --json alone for stdout")
    if not os.path.isdir(folder):
        raise _UsageError(
            f"--json {target!r}: directory {folder!r} does not exist; create it first, or pass --json alone for stdout"
        )


def _resolve_model(model: str) -> tuple[str, str | None]:
    """``check``'s argument: (model_type, None) for a model_type of the installed transformers,
    (model_type, directory) for a local directory with config.json; else a usage error. Reads
    nothing but local files."""
    path = os.path.expanduser(model)
    known = set(_known_model_types())
    as_type = model in known and not _looks_like_path(model)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return _checkpoint_model_type(path), path
        if as_type:  # a folder that happens to share the model_type's name
            return model, None
        raise _UsageError(
            f"directory {model!r} has no config.json; pass the checkpoint directory itself (the one holding "
            "config.json, e.g. a snapshot folder of the Hugging Face cache)"
        )
    if os.path.exists(path):
        parent = os.path.dirname(model) or "."
        raise _UsageError(
            f"{model!r} is a file, not a directory; pass the directory that contains config.json ({parent!r})"
        )
    if as_type:
        return model, None
    if _HUB_ID.fullmatch(model):
        name = model.split("/")[1]
        raise _UsageError(
            f"no local directory {model!r} exists, and check reads local directories only (it never downloads "
            f"from the Hugging Face Hub); if it is a Hub repo id, download it first, e.g. `huggingface-cli download "
            f"{model} config.json --local-dir {name}` or huggingface_hub.snapshot_download({model!r}, "
            f"local_dir={name!r}), and pass that directory"
        )
    if _looks_like_path(model):
        raise _UsageError(
            f"directory {model!r} does not exist; pass an existing checkpoint directory containing config.json, "
            "or a model_type"
        )
    raise _unknown_model_type(model, or_directory=True)


def _read_config_json(directory: str) -> dict:
    file = os.path.join(directory, "config.json")
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError) as err:
        raise _UsageError(f"cannot read {file!r} ({type(err).__name__}: {err}); check its permissions") from None
    except json.JSONDecodeError as err:
        raise _UsageError(
            f"{file!r} is not valid JSON ({err}); fix it, or download the checkpoint's config.json again"
        ) from None
    if not isinstance(data, dict):
        raise _UsageError(
            f"{file!r} holds a JSON {type(data).__name__}, not an object; download the checkpoint's config.json again"
        )
    return data


def _checkpoint_model_type(directory: str) -> str:
    """The model_type of ``directory``/config.json, known to the installed transformers."""
    file = os.path.join(directory, "config.json")
    model_type = _read_config_json(directory).get("model_type")
    if not model_type or not isinstance(model_type, str):
        raise _UsageError(
            f'{file!r} has no model_type; add it (e.g. "model_type": "llama"), or download the checkpoint\'s '
            "config.json again"
        )
    if model_type not in set(_known_model_types()):
        raise _UsageError(
            f"model_type {model_type!r} of {file!r} is unknown to the installed transformers "
            f"{_transformers_version()}; upgrade transformers (pip install -U transformers) to a release that has it"
        )
    return model_type


def _load_checkpoint_config(directory: str):
    """``AutoConfig`` of a local directory whose config.json :func:`_checkpoint_model_type` accepted."""
    from transformers import AutoConfig

    file = os.path.join(directory, "config.json")
    try:
        return AutoConfig.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:  # the file's content, not this program
        raise _UsageError(
            f"transformers {_transformers_version()} cannot load {file!r} ({type(err).__name__}: "
            f"{clip(str(err))}); fix the config, or upgrade transformers "
            "(pip install -U transformers)"
        ) from None


# ---------------------------------------------------------------------------------------------
# rows and reports


def _variants(model_type: str, checkpoint_config=None) -> dict:
    """{variant: tiny config}: a checkpoint's twin, the entry's variants, or an unregistered type's twin."""
    from .registry import REGISTRY, _load_entries
    from .twins import tiny_config

    if checkpoint_config is not None:
        return {"twin-of-checkpoint": tiny_config(checkpoint_config)}  # same classes and flags, CPU size
    _load_entries()
    if model_type in REGISTRY:
        return test_variants(model_type)
    return {"twin": tiny_config(model_type)}  # apply refuses it: the row shows upstream's own errors


def _error_row(model_type: str, variant: str, err: Exception) -> Row:
    nan = float("nan")
    return Row(model_type, variant, nan, nan, nan, "-", "ERROR", clip(f"{type(err).__name__}: {err}", 160))


def _rows(model_type: str, args: argparse.Namespace, dtype: torch.dtype | None, checkpoint_config=None) -> list[Row]:
    """The rows of one model_type; a crash is that row's ERROR, not a traceback of the command."""
    try:
        configs = _variants(model_type, checkpoint_config)
    except Exception as err:
        variant = "twin-of-checkpoint" if checkpoint_config is not None else "-"
        return [_error_row(model_type, variant, err)]
    rows = []
    for variant, config in configs.items():
        try:
            rows.append(
                check_config(
                    model_type, variant, config, backend=args.backend, tol=args.tol, dtype=dtype, device=args.device
                )
            )
        except Exception as err:
            rows.append(_error_row(model_type, variant, err))
    return rows


def _json_safe(obj):
    """``obj`` with every NaN or infinity as None: strict JSON has neither."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _write_json(report, target: str) -> None:
    """``report`` as strict JSON to ``target`` ('-': stdout)."""
    text = json.dumps(_json_safe(report), indent=1, allow_nan=False)
    if target == "-":
        print(text)
    else:
        with open(target, "w") as fh:
            fh.write(text + "\n")


def scan_all_report(rows, version: str) -> dict:
    """What ``scan --all --json`` writes: the versions, the counts and the rows."""
    return {
        "transformers": version,
        "torch": torch.__version__,
        "counts": dict(Counter(r.verdict for r in rows)),
        "rows": [asdict(r) for r in rows],
    }


def check_report(model: str, model_type: str, rows: list[Row]) -> dict:
    """What ``check --json`` writes: the model as given, its model_type, the versions, the rows and the verdict."""
    from . import __version__

    return {
        "model": model,
        "model_type": model_type,
        "transformers": _transformers_version(),
        "torch": torch.__version__,
        "hf_varlen_patch": __version__,
        "rows": [asdict(r) for r in rows],
        "passed": bool(rows) and all(r.verdict == "PASS" for r in rows),
    }


def _human_stream(args: argparse.Namespace):
    """Where the table goes: stderr when the JSON report takes stdout."""
    return sys.stderr if args.json == "-" else sys.stdout


def _validate_common(args: argparse.Namespace) -> None:
    _validate_backend(args.backend)
    _validate_device(args.device)
    _validate_json_target(args.json)


def cmd_scan_all(args: argparse.Namespace) -> int:
    import transformers

    from .coverage import scan_all, terminal_progress

    _validate_common(args)
    _validate_model_types(args.model_types)
    start = time.perf_counter()
    rows = scan_all(args.model_types or None, backend=args.backend, tol=args.tol, progress=terminal_progress())
    report = scan_all_report(rows, transformers.__version__)
    out = _human_stream(args)
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
        f"max |packed - separate| over logits, loss and gradients (tolerance {args.tol:g})",
        file=out,
    )
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1], file=out)
    print(f"\n{report['counts']} over {len(rows)} model_types in {time.perf_counter() - start:.0f}s", file=out)
    if args.json:
        _write_json(report, args.json)
    return 1 if report["counts"].get("FAIL") else 0


def cmd_scan(args: argparse.Namespace) -> int:
    if args.all:
        return cmd_scan_all(args)
    _validate_common(args)
    _validate_model_types(args.model_types)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    from transformers import CONFIG_MAPPING

    # by default the registered types this release has (an entry may cover types of other releases)
    model_types = args.model_types or [mt for mt in supported_model_types() if mt in CONFIG_MAPPING]
    from .coverage import terminal_progress

    rows = []
    start = time.perf_counter()
    progress = terminal_progress()
    for done, model_type in enumerate(model_types):
        progress(done, len(model_types), model_type)
        rows.extend(_rows(model_type, args, dtype))
    progress(len(model_types), len(model_types), "")
    out = _human_stream(args)
    _print_table(rows, args.tol, file=out)
    counts = Counter(r.verdict for r in rows)
    print(f"\n{dict(counts)} in {time.perf_counter() - start:.0f}s", file=out)
    if args.json:
        _write_json([asdict(r) for r in rows], args.json)
    return 0 if counts.get("PASS", 0) == len(rows) else 1


def cmd_check(args: argparse.Namespace) -> int:
    """One model: a model_type's tiny variants, or a tiny twin of a local checkpoint directory's config."""
    _validate_common(args)
    model_type, directory = _resolve_model(args.model)
    checkpoint_config = _load_checkpoint_config(directory) if directory is not None else None
    if checkpoint_config is not None:
        model_type = checkpoint_config.model_type
    dtype = getattr(torch, args.dtype) if args.dtype else None
    rows = _rows(model_type, args, dtype, checkpoint_config)
    _print_table(rows, args.tol, command="check", file=_human_stream(args))
    report = check_report(args.model, model_type, rows)
    if args.json:
        _write_json(report, args.json)
    return 0 if report["passed"] else 1


def architecture_table() -> str:
    """The registry as the README's table: one row per family (entry module) and notes, so that
    every entry's notes show where a family declares several entries."""
    from .registry import REGISTRY

    rows: dict[tuple[str, str], list[str]] = {}
    for model_type in supported_model_types():
        entry = REGISTRY[model_type]
        rows.setdefault((entry.family, entry.notes), []).append(model_type)
    lines = ["| entry | model_types | what carries the boundaries |", "| --- | --- | --- |"]
    for (family, notes), types in sorted(rows.items(), key=lambda row: (row[0][0], row[1])):
        names = ", ".join(f"`{mt}`" for mt in types)
        lines.append(f"| `patches/{family}.py` | {names} | {notes} |")
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
            p.add_argument(
                "model",
                help="a model_type, or a local checkpoint directory with config.json (never downloaded from the Hub)",
            )
            p.add_argument(
                "--json", nargs="?", const="-", help="write the report as JSON to this file ('-' or none: stdout)"
            )
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
    try:
        return commands[args.command](args)
    except _UsageError as err:
        print(f"{parser.prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return USAGE_ERROR
    except BrokenPipeError:  # `... | head`: the reader left; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
