"""Parameter differences after 3 SGD steps (float32, CPU): padded run vs packed run, without and
with ``apply``, for HF Trainer, TRL SFTTrainer (padding-free, LoRA) and gradient checkpointing.

    .venv-tf4.57.6/bin/python scripts/training_equivalence.py      # or .venv (5.25.0)
    ... --bf16    # TRL runs with its own default, bf16 autocast, and the bf16-vs-fp32 noise

Reuses the set-ups of tests/test_training.py, which asserts the same comparisons.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import transformers  # noqa: E402
from test_training import flattening, fresh, max_diff, padded_collator, sft, train  # noqa: E402

import hf_varlen_patch  # noqa: E402


def quiet(run, *args, **kwargs):
    """A run's parameters without Trainer's log lines; a crash is reported by its exception's name."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return run(*args, **kwargs)
        except Exception as err:  # upstream can crash where the patch does not: that is a result
            return type(err).__name__


def cell(run: dict | str, padded: dict) -> str:
    return run if isinstance(run, str) else f"{max_diff(run, padded):.1e}"


def row(what: str, plain: dict | str, patched: dict | str, padded: dict, extra: str = "") -> None:
    print(f"| {what} | {cell(plain, padded)} | {cell(patched, padded)}{extra} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bf16", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    print(f"transformers {transformers.__version__}: max |param difference| vs the padded run after 3 SGD steps")
    print("| stack | model | packed, no apply | packed + apply |")
    print("| --- | --- | --- | --- |")
    for model_type in ("llama", "gpt2", "falcon", "opt", "bloom", "qwen2_moe"):
        padded = quiet(train, fresh(model_type), padded_collator, tmp)
        plain = quiet(train, fresh(model_type), flattening(), tmp)
        patched = quiet(train, hf_varlen_patch.apply(fresh(model_type)), flattening(), tmp)
        row(f"Trainer + flattening | {model_type}", plain, patched, padded)
    for model_type in ("llama", "gpt_neo", "bloom", "qwen3_next"):
        padded = quiet(train, fresh(model_type), padded_collator, tmp)
        ckpt = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True})
        plain = quiet(train, fresh(model_type), flattening(), tmp, **ckpt)
        patched = quiet(train, hf_varlen_patch.apply(fresh(model_type)), flattening(), tmp, **ckpt)
        row(f"Trainer + checkpointing (reentrant) | {model_type}", plain, patched, padded)
    for model_type in ("llama", "opt", "qwen2_moe"):
        for peft in (False, True):
            run = dict(peft=peft, bf16=args.bf16)
            padded = quiet(sft, fresh(model_type), tmp, **run)
            plain = quiet(sft, fresh(model_type), tmp, **run, padding_free=True)
            patched = quiet(sft, hf_varlen_patch.apply(fresh(model_type)), tmp, **run, padding_free=True)
            extra = ""
            if args.bf16:
                noise = max_diff(padded, quiet(sft, fresh(model_type), tmp, peft=peft))
                extra = f" (bf16 padded vs fp32 padded: {noise:.1e})"
            stack = "SFTTrainer padding_free" + (" + LoRA" if peft else "") + (" bf16" if args.bf16 else "")
            row(f"{stack} | {model_type}", plain, patched, padded, extra)


if __name__ == "__main__":
    main()
