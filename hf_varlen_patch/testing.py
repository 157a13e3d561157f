"""The equivalence harness (public API): tiny models, packed batches, packed-vs-separate checks.

``compare_packed(model, batch)`` runs every sequence of a packed batch alone, then the packed
batch, and returns the largest differences in logits, loss and parameter gradients. The
hypothesis strategies draw packed layouts for property tests.

The runs themselves live in :mod:`hf_varlen_patch.equivalence`, which takes a model's label-shift
rule as an argument; here it is read from the model's patch state or registry entry, and the
tiny models come from the registry's test configs.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from . import equivalence
from .equivalence import (
    LAYOUTS,
    Comparison,
    PackedBatch,
    Run,
    build_twin,
    compare_multimodal,
    long_memory,
    make_packed_batch,
    packed_layouts,
    relative_errors,
    worst_over_layouts,
)
from .equivalence import max_grad_error as max_grad_error  # importable from here, as before
from .equivalence import max_logits_error as max_logits_error
from .equivalence import worst_error as worst_error
from .registry import lookup
from .samples import inputs_on_model, multimodal_sample
from .twins import TwinError, tiny_config

__all__ = [
    "tiny_config",
    "PackedBatch",
    "Comparison",
    "tiny_model",
    "test_variants",
    "registered_variants",
    "make_packed_batch",
    "compare_packed",
    "run_separate",
    "run_packed",
    "relative_errors",
    "model_shifts_labels",
    "Run",
    "packed_layouts",
    "long_memory",
    "multimodal_layouts",
    "multimodal_samples",
    "compare_multimodal",
    "inputs_on_model",
    "assert_packing_equivalent",
    "worst_error",
    "LAYOUTS",
]


def test_variants(model_type: str) -> dict[str, Any]:
    """{variant name: tiny config} that the registry entry declares for ``model_type``."""
    return lookup(model_type).variants(model_type)


test_variants.__test__ = False  # not a pytest test despite the name


def registered_variants(*, refused: bool = False, multimodal: bool = False) -> list[tuple[str, str]]:
    """(model_type, variant) for every test config of every registry entry whose model_type the
    installed transformers has; with ``refused=True`` the ones the entry refuses instead. Text
    models by default (batches of token ids); ``multimodal=True``: the vision-language entries'
    types instead (samples with images: :func:`multimodal_samples`)."""
    from transformers import CONFIG_MAPPING

    from .registry import supported_model_types

    out = []
    for mt in supported_model_types():
        if mt not in CONFIG_MAPPING:
            continue  # a model_type of another transformers release
        entry = lookup(mt)
        if (entry.multimodal is not None) != multimodal:
            continue
        try:
            variants = test_variants(mt)
        except TwinError:
            # no twin on this release: only acceptable where the entry refuses the type here anyway
            if entry.refusal(CONFIG_MAPPING[mt]()):
                continue
            raise
        for variant, config in variants.items():
            reason = entry.refusal(config)
            if bool(reason) == refused:
                out.append((mt, variant))
    return out


def auto_class(model_type: str) -> type:
    """The Auto class that builds ``model_type``'s models for tests: image-text-to-text for a
    vision-language entry (vision tower included), else causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if lookup(model_type).multimodal is not None else AutoModelForCausalLM


def tiny_model(
    model_type: str,
    variant: str | None = None,
    *,
    seed: int = 0,
    attn_implementation: str | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    min_head_dim: int | None = None,
) -> torch.nn.Module:
    """A tiny, randomly initialised causal LM (or vision-language model) of ``model_type`` (one of
    its test variants), in ``dtype`` (default: the entry's ``test_dtype``, float32 for almost all). Recurrent layers get
    :func:`long_memory` weights, so a state leak across packed sequences cannot hide.

    ``min_head_dim`` widens the twin until its attention heads are at least that wide (hidden
    sizes and explicit head dims scaled alike), for kernels that refuse narrow heads (FA4 trains
    none below 32); where that cannot be done (head dims of their own, as in MLA, or sizes tied
    to the head dim) the twin comes as it is."""
    variants = test_variants(model_type)
    config = variants[variant] if variant is not None else next(iter(variants.values()))
    build = dict(model_class=auto_class(model_type), seed=seed, attn_implementation=attn_implementation)
    wide = _widened_config(config, min_head_dim) if min_head_dim else None
    model = None
    if wide is not None:
        try:  # built and run once on the host first: a device fault would poison the process
            model = build_twin(wide, **build)
            with torch.no_grad():
                model(input_ids=torch.ones(1, 8, dtype=torch.long), use_cache=False)
        except Exception:
            model = None
    if model is None:
        model = build_twin(config, **build)
    return model.to(device=device, dtype=dtype or lookup(model_type).test_dtype)


def _widened_config(config: Any, min_head_dim: int) -> Any | None:
    """A copy of ``config`` whose attention heads are at least ``min_head_dim`` wide, or None
    where widening the hidden size would not reach the heads."""
    from .patching import nested_configs

    config = copy.deepcopy(config)
    for sub in nested_configs(config):
        heads, hidden = getattr(sub, "num_attention_heads", None), getattr(sub, "hidden_size", None)
        if not heads or not hidden:
            continue
        head_dim = getattr(sub, "head_dim", None) or hidden // heads
        if head_dim >= min_head_dim:
            continue
        factor = -(-min_head_dim // head_dim)
        sub.hidden_size = hidden * factor
        if vars(sub).get("head_dim"):  # (a property on some configs: derived from hidden_size)
            sub.head_dim = head_dim * factor
        if (getattr(sub, "head_dim", None) or sub.hidden_size // heads) < min_head_dim:
            return None  # head dims of their own (MLA: qk_nope/qk_rope/v_head_dim)
    return config


# ---------------------------------------------------------------- runs with the model's own rules


def model_shifts_labels(model: torch.nn.Module) -> bool:
    """Whether ``model`` shifts ``labels`` inside its loss (most causal LMs); False for the
    decoders whose ``labels[t]`` is the target of ``logits[t]`` (their registry entry says so)."""
    from .api import STATE_ATTR, find_hf_model
    from .registry import REGISTRY, _load_entries

    hf_model = find_hf_model(model)
    state = vars(hf_model).get(STATE_ATTR)
    if state is not None:
        return state.entry.shifts_labels
    _load_entries()
    entry = REGISTRY.get(getattr(hf_model.config, "model_type", None))
    return True if entry is None else entry.shifts_labels


def _takes_position_ids(model: torch.nn.Module) -> bool:
    """A patched model takes them; an unpatched one may number its tokens itself (4.57 BartForCausalLM)."""
    from .api import is_patched
    from .patching import accepts_argument

    return is_patched(model) or accepts_argument(model.forward, "position_ids")


def run_rules(model: torch.nn.Module, shifts_labels: bool | None = None) -> dict[str, bool]:
    """The keyword arguments :mod:`~hf_varlen_patch.equivalence`'s runs need for ``model``, read
    from its patch state and registry entry: ``shifts_labels`` (unless given) and ``takes_position_ids``."""
    if shifts_labels is None:
        shifts_labels = model_shifts_labels(model)
    return {"shifts_labels": shifts_labels, "takes_position_ids": _takes_position_ids(model)}


def run_separate(
    model: torch.nn.Module, batch: PackedBatch, *, grads: bool = True, shifts_labels: bool | None = None
) -> Run:
    """Each sequence of ``batch`` alone (no cache), as the ground truth; ``shifts_labels``
    default: :func:`model_shifts_labels`."""
    shifts_labels = model_shifts_labels(model) if shifts_labels is None else shifts_labels
    return equivalence.run_separate(model, batch, grads=grads, shifts_labels=shifts_labels)


def run_packed(
    model: torch.nn.Module,
    batch: PackedBatch,
    *,
    grads: bool = True,
    use_cache: bool | None = False,
    shifts_labels: bool | None = None,
) -> Run:
    """``batch`` packed, as a user would run it (``use_cache=None`` keeps the model's default);
    ``shifts_labels`` default: :func:`model_shifts_labels`."""
    rules = run_rules(model, shifts_labels)
    return equivalence.run_packed(model, batch, grads=grads, use_cache=use_cache, **rules)


def compare_packed(
    model: torch.nn.Module,
    batch: PackedBatch,
    *,
    grads: bool = True,
    use_cache: bool | None = False,
    train: bool = True,
    shifts_labels: bool | None = None,
) -> Comparison:
    """Run each sequence alone and the packed batch; return the largest differences
    (:func:`hf_varlen_patch.equivalence.compare_packed`: logits, the mean next-token loss, the
    model's own loss and gradients). ``use_cache=None`` leaves the model's default;
    ``shifts_labels`` default: :func:`model_shifts_labels`.
    """
    rules = run_rules(model, shifts_labels)
    return equivalence.compare_packed(model, batch, grads=grads, use_cache=use_cache, train=train, **rules)


# ---------------------------------------------------------------- a one-line check for users' suites


def _model_for(model_or_config: Any) -> torch.nn.Module:
    """The model to check: the given one, or a tiny random twin of a config / model_type / local
    checkpoint directory (CPU, float32 or the entry's test dtype, recurrent layers long-lived)."""
    import os

    from transformers import AutoConfig

    from .registry import REGISTRY

    if isinstance(model_or_config, torch.nn.Module):
        return model_or_config
    config = model_or_config
    if isinstance(config, (str, os.PathLike)) and os.path.isdir(config):
        config = AutoConfig.from_pretrained(config)
    twin = tiny_config(config)
    entry = REGISTRY.get(twin.model_type)
    return build_twin(twin, dtype=entry.test_dtype if entry is not None else torch.float32)


def assert_packing_equivalent(
    model_or_config: Any,
    *,
    backend: str = "auto",
    tol: float | None = None,
    layouts: Sequence[dict] = LAYOUTS,
    grads: bool = True,
) -> Comparison:
    """Assert that packed batches give what each sequence gives alone, once ``apply`` is on.

    ``model_or_config``: your model (patched here if it is not yet, and unpatched again after),
    or a config, model_type or local checkpoint directory, of which a tiny random twin is built
    on the CPU. Compares logits, the loss and gradients (train mode) over ``layouts``
    (:func:`make_packed_batch` kwargs; default: one row of three sequences, and two rows, one
    ending in padding), with the default cache setting and ``use_cache=False``.
    ``tol``: absolute, default 1e-5 (1e-9 in float64); pass one for half precision, judged
    against the unpacked run's own noise. Raises ``AssertionError`` naming the worst error;
    returns the worst :class:`Comparison`. In a test suite::

        from hf_varlen_patch.testing import assert_packing_equivalent

        def test_my_model_packs():
            assert_packing_equivalent("path/to/checkpoint")   # or a config, or a model
    """
    from .api import apply, is_patched, unapply

    model = _model_for(model_or_config)
    dtype = next(model.parameters()).dtype
    if tol is None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"pass tol= for a {dtype} model: half precision needs a tolerance judged by its noise")
        tol = 1e-9 if dtype == torch.float64 else 1e-5
    patched_here = not is_patched(model)
    if patched_here:
        apply(model, backend)
    try:
        worst = worst_over_layouts(model, layouts, grads=grads, stop_above=tol, **run_rules(model))
        if not worst.comparison.ok(tol):
            raise AssertionError(
                f"packed != separate for {type(model).__name__} (rows {worst.layout['rows']}, use_cache="
                f"{worst.use_cache}): {worst.comparison} exceeds {tol:g}"
            )
        return worst.comparison
    finally:
        if patched_here:
            unapply(model)


# ---------------------------------------------------------------- multimodal samples


#: Rows of samples with 0, 1 and 2 images; a video sample is added where the model takes videos
#: next to images.
MULTIMODAL_LAYOUTS = ([4, "image", 5], [6], [3, "image", 2, "image", 4])
VIDEO_LAYOUT = [5, "video", 2]


def multimodal_layouts(model_type: str) -> list[list[Any]]:
    """The standard sample layouts for ``model_type`` (tests, scan, check): text-only for entries
    that pack only text rows, plus :data:`VIDEO_LAYOUT` where videos mix with images."""
    spec = lookup(model_type).multimodal
    if spec is not None and model_type in spec.text_only:
        layouts = [[n for n in layout if isinstance(n, int)] for layout in MULTIMODAL_LAYOUTS]
    else:
        layouts = [list(layout) for layout in MULTIMODAL_LAYOUTS]
    if spec is not None and model_type in spec.videos_with_images:
        layouts.append(list(VIDEO_LAYOUT))
    return layouts


def multimodal_samples(model: torch.nn.Module, layouts: Sequence[Sequence[Any]], seed: int = 0) -> list[dict]:
    """Processor-like inputs of one sample per layout for a tiny vision-language twin, laid out as
    its entry's :class:`~hf_varlen_patch.registry.MultimodalSpec` says. A layout lists text lengths
    and ``"image"`` / ``"video"`` in order: ``[[5, "image", 3], [7], [2, "image", 1, "image", 4]]``."""
    from .api import find_hf_model
    from .registry import lookup

    hf_model = find_hf_model(model)
    spec = lookup(hf_model.config.model_type).multimodal
    if spec is None:
        raise ValueError(f"{hf_model.config.model_type} has no multimodal sample builder")
    generator = torch.Generator().manual_seed(seed)
    return [
        multimodal_sample(
            hf_model, list(layout), generator, mrope=spec.mrope, videos_in_image_tokens=spec.videos_in_image_tokens
        )
        for layout in layouts
    ]
