"""Coverage of the installed transformers: one verdict per model_type of the causal-LM mapping
and of the image-text-to-text mapping (registered vision-language types run with image samples).

``scan_all()`` builds each type's tiny twin, measures upstream's packed-vs-separate error (with
``use_cache=False`` and with the default cache), then patches it and measures again:

- PASS: the registry entry makes packed == separate (logits, loss, gradients);
- FAIL: the entry is registered but the twin is not exact (a bug);
- REFUSED: the entry refuses this configuration, with its reason;
- NO-ENTRY: no entry; what it would need (hybrid/recurrent layers, a multimodal model, attention
  outside the AttentionInterface, ...) or, where the generic route passes its self-check, that
  `apply` patches it after that check; an unregistered vision-language type whose twin builds
  (upstream's error measured on text-only packed rows);
- UNBUILDABLE: no twin can be built or run upstream, with the reason.
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .equivalence import (
    LAYOUTS,
    MULTIMODAL_BOUNDARIES,
    build_twin,
    compare_multimodal,
    compare_packed,
    float32_twin,
    make_packed_batch,
    worst_over_layouts,
)
from .errors import VarlenPatchError
from .testing import run_rules

__all__ = ["CoverageRow", "causal_lm_types", "multimodal_types", "scan_type", "scan_all", "kind_of", "VERDICTS"]

VERDICTS = ("PASS", "REFUSED", "NO-ENTRY", "UNBUILDABLE", "FAIL")
#: Module class names of state that runs along the sequence outside attention.
RECURRENT_MODULES = re.compile(
    r"Mamba|SSM|Ssm[A-Z]|Mixer|DeltaNet|GatedDelta|LinearAttention|LinearAttn|Kda|KDA|Recurrent|RgLru|RGLRU|"
    r"Rwkv|RWKV|Lstm|LSTM|ShortConv|Hybrid|Lightning"
)
#: Sub-configs that make a config multimodal.
MODALITY_CONFIGS = (
    "vision_config",
    "audio_config",
    "vq_config",
    "audio_encoder",
    "vision_tower",
    "speech_config",
    "text_config",  # a composite config: the text model is one part of a multimodal one
)


@dataclass
class CoverageRow:
    model_type: str
    kind: str  # text | hybrid | multimodal | ?
    upstream_no_cache: float | None
    upstream_default: float | None
    patched: float | None
    backend: str
    verdict: str
    reason: str = ""


def clip(text: str, width: int = 200) -> str:
    """``text`` on one line, cut at a word boundary (with "...") when longer than ``width``."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 4].rsplit(" ", 1)[0] + " ..."


def causal_lm_types() -> list[str]:
    """Every model_type of the installed ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def multimodal_types() -> list[str]:
    """Every model_type of the installed ``MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`` (registered
    ones are scanned with image samples, the others get the verdict their twin allows)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return list(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def _scan_unregistered_multimodal(model_type: str, entry: Any, twin: Any) -> CoverageRow:
    """An image-text-to-text type outside the causal-LM mapping with no multimodal entry: REFUSED
    (its entry's reason), UNBUILDABLE (no twin runs) or NO-ENTRY, with upstream's error on packed
    text-only rows where its forward runs them."""
    from transformers import AutoModelForImageTextToText

    nan = math.nan
    refusal = entry.refusal(twin) if entry is not None else None
    try:
        model = build_twin(twin, model_class=AutoModelForImageTextToText, long_lived=False).float()
    except Exception as err:
        if refusal:
            return CoverageRow(model_type, "multimodal", nan, nan, nan, "-", "REFUSED", clip(refusal))
        reason = f"twin does not build: {_err(err)}"
        return CoverageRow(model_type, "multimodal", nan, nan, nan, "-", "UNBUILDABLE", reason)
    vocab = getattr(model.config.get_text_config(), "vocab_size", None)
    try:
        up_nc, up_def = upstream_errors(model, vocab) if vocab else (nan, nan)
    except Exception:  # a forward that needs vision inputs; the twin builds, the verdict stands
        up_nc, up_def = nan, nan
    if refusal:
        return CoverageRow(model_type, "multimodal", up_nc, up_def, nan, "-", "REFUSED", clip(refusal))
    if entry is not None:
        reason = f"the {entry.family} entry has no multimodal sample builder to check it with"
        return CoverageRow(model_type, "multimodal", up_nc, up_def, nan, "-", "FAIL", reason)
    need = "packed image/text samples: a vision-language entry (patches/multimodal.py)"
    return CoverageRow(model_type, "multimodal", up_nc, up_def, nan, "-", "NO-ENTRY", need)


def _scan_multimodal(
    model_type: str,
    entry: Any,
    twin: Any,
    backend: str,
    tol: float,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> CoverageRow:
    from transformers import AutoModelForImageTextToText

    from . import api
    from .testing import multimodal_layouts, multimodal_samples

    nan = math.nan
    refusal = entry.refusal(twin)
    if refusal:
        return CoverageRow(model_type, "multimodal", nan, nan, nan, "-", "REFUSED", clip(refusal))
    try:
        dtype = dtype or entry.test_dtype
        model = build_twin(twin, model_class=AutoModelForImageTextToText, long_lived=False, device=device, dtype=dtype)
    except Exception as err:
        reason = f"twin does not build: {_err(err)}"
        return CoverageRow(model_type, "multimodal", nan, nan, nan, "-", "UNBUILDABLE", reason)
    samples = multimodal_samples(model, multimodal_layouts(model_type))
    up_nc = compare_multimodal(model, samples, grads=False).logits
    up_def = compare_multimodal(model, samples, grads=False, use_cache=None).logits
    try:
        api.apply_entry(model, entry, backend=backend)
        patched, used, verdict = measure_patched(
            model,
            tol,
            layouts=MULTIMODAL_BOUNDARIES,
            compare=lambda model, layout, use_cache: compare_multimodal(
                model, samples, layout=layout, use_cache=use_cache
            ),
        )
    except VarlenPatchError as err:
        return CoverageRow(model_type, "multimodal", up_nc, up_def, nan, "-", "REFUSED", clip(str(err)))
    except Exception as err:
        return CoverageRow(model_type, "multimodal", up_nc, up_def, nan, "-", "FAIL", _err(err))
    return CoverageRow(model_type, "multimodal", up_nc, up_def, patched, used, verdict)


def kind_of(config: Any, model: torch.nn.Module | None = None) -> str:
    """ "multimodal" (a vision/audio sub-config), "hybrid" (conv/SSM/recurrent modules) or "text"."""
    if any(getattr(config, name, None) is not None for name in MODALITY_CONFIGS):
        return "multimodal"
    if model is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Conv1d) or RECURRENT_MODULES.search(type(module).__name__):
                return "hybrid"
    return "text"


def _err(err: BaseException) -> str:
    return clip(f"{type(err).__name__}: {err}")


def upstream_errors(model: torch.nn.Module, vocab: int) -> tuple[float, float]:
    """The unpatched model's packed-vs-separate logits error on the first of :data:`LAYOUTS` (one
    row, no padding), with ``use_cache=False`` and with the default cache (NaN where that crashes)."""
    rules = run_rules(model)
    batch = make_packed_batch(vocab_size=vocab, **LAYOUTS[0])
    no_cache = compare_packed(model, batch, grads=False, use_cache=False, **rules).logits
    try:
        default = compare_packed(model, batch, grads=False, use_cache=None, **rules).logits
    except Exception:  # upstream's own cache path may crash on packed inputs; the no-cache one ran
        default = math.nan
    return no_cache, default


def measure_patched(model: torch.nn.Module, tol: float, **over: Any) -> tuple[float, str, str]:
    """A patched model's worst packed-vs-separate error (:func:`worst_over_layouts` with ``over``;
    default: token batches of :data:`LAYOUTS` under the model's own rules), the backends its packed
    runs used ("upstream": none of ours) and the verdict, PASS or FAIL."""
    from .attention import BACKEND_USAGE

    if "compare" not in over:
        over = {**run_rules(model), **over}
    BACKEND_USAGE.clear()
    patched = worst_over_layouts(model, **over).max_error
    used = ",".join(sorted(BACKEND_USAGE)) or "upstream"
    return patched, used, "PASS" if math.isfinite(patched) and patched <= tol else "FAIL"


def _refusal_of_default(entry: Any, model_type: str) -> str | None:
    """A registered entry's refusal of the type's default config (when no twin can be built)."""
    from transformers import CONFIG_MAPPING

    if entry is None:
        return None
    try:
        return entry.refusal(CONFIG_MAPPING[model_type]())
    except Exception:
        return None


def scan_type(model_type: str, *, backend: str = "sdpa", tol: float = 1e-5, config: Any = None) -> CoverageRow:
    """The coverage row of one model_type (its twin, or a twin of ``config``)."""
    from . import api
    from .registry import REGISTRY, _load_entries
    from .selfcheck import self_check
    from .twins import TwinError, tiny_config

    _load_entries()
    nan = math.nan
    entry = REGISTRY.get(model_type)
    vision_only = model_type not in causal_lm_types() and model_type in multimodal_types()
    try:
        if config is None and entry is not None and entry.test_configs is not None:
            twin = next(iter(entry.variants(model_type).values()))  # the entry's own first variant
        else:
            twin = tiny_config(config if config is not None else model_type)
    except TwinError as err:
        kind = "multimodal" if vision_only else "?"
        refusal = _refusal_of_default(entry, model_type)
        if refusal:
            return CoverageRow(model_type, kind, nan, nan, nan, "-", "REFUSED", clip(refusal))
        return CoverageRow(model_type, kind, nan, nan, nan, "-", "UNBUILDABLE", clip(str(err)))
    if entry is not None and entry.multimodal is not None:
        return _scan_multimodal(model_type, entry, twin, backend, tol)
    if vision_only:
        return _scan_unregistered_multimodal(model_type, entry, twin)
    kind = kind_of(twin)
    try:
        model = float32_twin(twin)
    except Exception as err:
        refusal = _refusal_of_default(entry, model_type)
        if refusal:
            return CoverageRow(model_type, kind, nan, nan, nan, "-", "REFUSED", clip(refusal))
        return CoverageRow(model_type, kind, nan, nan, nan, "-", "UNBUILDABLE", f"twin does not build: {_err(err)}")
    kind = kind_of(twin, model)
    vocab = getattr(model.config.get_text_config(), "vocab_size", None)
    if not vocab:
        return CoverageRow(model_type, kind, nan, nan, nan, "-", "UNBUILDABLE", "the config has no vocab_size")
    refusal = entry.refusal(model.config) if entry is not None else None
    try:
        up_nc, up_def = upstream_errors(model, vocab)
    except Exception as err:
        if refusal:
            return CoverageRow(model_type, kind, nan, nan, nan, "-", "REFUSED", clip(refusal))
        reason = f"the twin does not run upstream: {_err(err)}"
        return CoverageRow(model_type, kind, nan, nan, nan, "-", "UNBUILDABLE", reason)

    if entry is None:
        if kind == "hybrid":
            need = "boundaries for its conv/SSM/recurrent layers: a hybrid entry (patches/hybrid.py)"
        elif kind == "multimodal":
            need = "packed image/text samples: a vision-language entry (patches/multimodal.py)"
        else:
            result = self_check(twin, use_cache=False, tol=tol)
            if result.passed:
                need = f"the generic route passes its self-check ({result.error:.1e}): apply patches it after that"
            elif "never reached" in result.reason:
                need = "attention outside the AttentionInterface: a dedicated patch"
            else:
                need = f"a dedicated patch: {result.reason}"
        return CoverageRow(model_type, kind, up_nc, up_def, nan, "-", "NO-ENTRY", clip(need))
    if refusal:
        return CoverageRow(model_type, kind, up_nc, up_def, nan, "-", "REFUSED", clip(refusal))
    try:
        model = model.to(entry.test_dtype)
        api.apply_entry(model, entry, backend=backend)
        patched, used, verdict = measure_patched(model, tol, vocab_size=vocab)
    except VarlenPatchError as err:
        return CoverageRow(model_type, kind, up_nc, up_def, nan, "-", "REFUSED", clip(str(err)))
    except Exception as err:
        return CoverageRow(model_type, kind, up_nc, up_def, nan, "-", "FAIL", _err(err))
    return CoverageRow(model_type, kind, up_nc, up_def, patched, used, verdict)


def scan_all(
    model_types: Iterable[str] | None = None,
    *,
    backend: str = "sdpa",
    tol: float = 1e-5,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[CoverageRow]:
    """One :class:`CoverageRow` per model_type (default: every causal LM of the installed release,
    then every image-text-to-text type that is not one)."""
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    if model_types:
        types = list(model_types)
    else:
        types = causal_lm_types()
        types += [t for t in multimodal_types() if t not in types]
    rows = []
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    logging.getLogger("hf_varlen_patch").setLevel(logging.ERROR)
    try:
        for i, model_type in enumerate(types):
            if progress is not None:
                progress(i, len(types), model_type)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    rows.append(scan_type(model_type, backend=backend, tol=tol))
                except Exception as err:  # a crash is that row's verdict, not the scan's
                    nan = math.nan
                    rows.append(CoverageRow(model_type, "?", nan, nan, nan, "-", "FAIL", _err(err)))
        if progress is not None:
            progress(len(types), len(types), "")
    finally:
        hf_logging.set_verbosity(level)
    return rows


def terminal_progress(stream=sys.stderr) -> Callable[[int, int, str], None]:
    """Progress on ``stream``: a one-line bar on a terminal; redirected (a log, CI), one flushed
    line per step, so a long scan shows where it is while it runs."""
    start = time.perf_counter()
    if not stream.isatty():

        def log(done: int, total: int, current: str) -> None:
            stream.write(f"[{done}/{total}] {time.perf_counter() - start:.0f}s {current}\n")
            stream.flush()

        return log

    def show(done: int, total: int, current: str) -> None:
        width = 30
        filled = int(width * done / max(total, 1))
        bar = "#" * filled + "." * (width - filled)
        text = f"\r[{bar}] {done}/{total} {time.perf_counter() - start:5.0f}s {current:<28}"
        stream.write(text if done < total else text + "\n")
        stream.flush()

    return show
