"""Self-check: decide on a tiny twin of the user's own config whether a patch makes it exact.

For a model_type without a registry entry, `apply` builds a twin (same classes and flags,
shrunk), patches it through the generic route, and compares packed with separate runs in float32
on the CPU (logits, loss, gradients; about a second). Only a pass lets `apply` patch the real
model. Verdicts are cached per (model_type, transformers version, config fingerprint), in memory
and in ``$HF_VARLEN_PATCH_CACHE`` (default ``~/.cache/hf_varlen_patch/self_check.json``).

What a twin can miss (and the guards):
- Sizes: behaviour that only appears at real widths or lengths (numerics of bf16 at scale,
  kernels chosen by size). Windows and chunk sizes are shrunk below the test lengths, so they are
  exercised; rotary scalings that depend on the input length are refused outright.
- Flags the shrink had to change: :func:`~hf_varlen_patch.twins.dropped_flags` lists them and
  the check fails rather than vouch for a different model.
- Code the twin never runs: remote code that branches on sizes, or attention that bypasses the
  AttentionInterface only in some layers. The check requires that packed attention actually ran.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import VarlenPatchError
from .twins import TwinError, config_fingerprint, dropped_flags, tiny_config

__all__ = ["SelfCheck", "self_check", "cache_path", "GENERIC_FAMILY"]

logger = logging.getLogger("hf_varlen_patch")
GENERIC_FAMILY = "self-check"
#: Layouts of the check: one row of three sequences; two rows with trailing padding.
LAYOUTS = (
    dict(rows=[[5, 9, 3]]),
    dict(rows=[[5, 9, 3, 11], [12, 7]], extra_padding=3, seed=1),
)
_MEMORY: dict[str, SelfCheck] = {}


@dataclass(frozen=True)
class SelfCheck:
    """The verdict of one self-check: ``passed`` and the largest packed-vs-separate error."""

    model_type: str
    transformers_version: str
    fingerprint: str
    passed: bool
    error: float
    reason: str = ""

    def key(self) -> str:
        return f"{self.model_type}|{self.transformers_version}|{self.fingerprint}"


def cache_path() -> Path:
    root = os.environ.get("HF_VARLEN_PATCH_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "hf_varlen_patch"
    return base / "self_check.json"


def _load_disk() -> dict[str, dict]:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _store(result: SelfCheck) -> None:
    _MEMORY[result.key()] = result
    try:
        path = cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load_disk()
        data[result.key()] = asdict(result)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as err:  # a read-only home is no reason to fail the check
        logger.debug("hf_varlen_patch: could not write the self-check cache: %s", err)


def _cached(key: str) -> SelfCheck | None:
    if key in _MEMORY:
        return _MEMORY[key]
    found = _load_disk().get(key)
    if found is None:
        return None
    try:
        result = SelfCheck(**found)
    except TypeError:
        return None
    _MEMORY[key] = result
    return result


def self_check(
    config: Any,
    *,
    entry: Any = None,
    model_class: type | None = None,
    tol: float = 1e-5,
    use_cache: bool = True,
) -> SelfCheck:
    """Check packed == separate on a tiny twin of ``config`` patched with ``entry`` (default: the
    generic route). ``model_class`` builds the twin (default: the AutoModelForCausalLM class)."""
    import transformers

    from .registry import PatchEntry

    model_type = config.model_type
    key_result = SelfCheck(model_type, transformers.__version__, config_fingerprint(config), False, math.nan)
    if use_cache:
        found = _cached(key_result.key())
        if found is not None:
            return found
    if entry is None:
        entry = PatchEntry(family=GENERIC_FAMILY, model_types=(model_type,))
    try:
        error, reason = _run(config, entry, model_class, tol)
    except (TwinError, VarlenPatchError) as err:
        error, reason = math.nan, str(err)
    except Exception as err:  # the twin itself does not run: no verdict to trust
        error, reason = math.nan, f"the tiny twin failed: {type(err).__name__}: {err}"[:300]
    passed = not reason and math.isfinite(error) and error <= tol
    if not passed and not reason:
        reason = f"packed and separate runs of the tiny twin differ by {error:.1e} (tolerance {tol:g})"
    result = SelfCheck(model_type, transformers.__version__, key_result.fingerprint, passed, error, reason)
    _store(result)
    return result


def _run(config: Any, entry: Any, model_class: type | None, tol: float) -> tuple[float, str]:
    from transformers import AutoModelForCausalLM

    from .api import apply_entry
    from .attention import BACKEND_USAGE
    from .testing import compare_packed, long_memory, make_packed_batch, worst_error

    twin = tiny_config(config)
    changed = dropped_flags(config, twin)
    if changed:
        names = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in list(changed.items())[:4])
        return math.nan, f"the tiny twin had to change flags that may matter: {names}"
    original = getattr(config, "_attn_implementation", None)
    # the CPU twin keeps eager or sdpa; kernels that need a GPU run the separate reference as sdpa
    twin._attn_implementation = original if original in ("eager", "sdpa") else "sdpa"
    torch.manual_seed(0)
    with torch.device("cpu"):
        if model_class is not None and hasattr(model_class, "_from_config"):
            model = model_class._from_config(twin)
        else:
            model = AutoModelForCausalLM.from_config(twin)
    model = long_memory(model.float())  # recurrent state that outlives a sequence, so a leak shows
    apply_entry(model, entry, backend="sdpa")
    vocab = model.config.get_text_config().vocab_size
    BACKEND_USAGE.clear()
    errors = [
        compare_packed(model, make_packed_batch(vocab_size=vocab, **layout), use_cache=use_cache).max_error
        for layout in LAYOUTS
        for use_cache in (None, False)
    ]
    if not BACKEND_USAGE:
        return math.nan, "the packed forward never reached the registered attention function"
    return worst_error(errors), ""
