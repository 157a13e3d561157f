"""`apply` and `unapply`: the one-liners."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TypeVar

import torch

from .attention import parse_implementation, register_implementation
from .backends import BACKENDS
from .errors import BackendUnavailableError, UnsupportedArchitectureError
from .patching import Patcher, accepts_var_kwargs, make_entry_wrapper, nested_configs, own_config
from .registry import PatchEntry, PatchOptions, lookup
from .versions import check_versions, is_tested, tested_range_text

__all__ = ["apply", "unapply", "is_patched", "find_hf_model"]

logger = logging.getLogger("hf_varlen_patch")
STATE_ATTR = "_hf_varlen_patch"
M = TypeVar("M", bound=torch.nn.Module)


@dataclass
class PatchState:
    entry: PatchEntry
    options: PatchOptions
    patcher: Patcher


def find_hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers PreTrainedModel inside wrappers (PEFT, DDP, FSDP, torch.compile)."""
    from transformers import PreTrainedModel

    seen = 0
    current = model
    while not isinstance(current, PreTrainedModel):
        seen += 1
        if seen > 8:
            break
        if hasattr(current, "get_base_model"):
            current = current.get_base_model()
        elif isinstance(getattr(current, "module", None), torch.nn.Module):
            current = current.module
        elif isinstance(getattr(current, "_orig_mod", None), torch.nn.Module):
            current = current._orig_mod
        else:
            break
    if not isinstance(current, PreTrainedModel):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is not a transformers PreTrainedModel (nor a PEFT/DDP/compiled "
            "wrapper of one); hf_varlen_patch patches transformers models only."
        )
    return current


def is_patched(model: torch.nn.Module) -> bool:
    return STATE_ATTR in vars(find_hf_model(model))


def apply(model: M, backend: str = "auto", *, check_inputs: bool = True) -> M:
    """Make ``model`` treat packed batches exactly like separate sequences; returns ``model``.

    Args:
        model: a transformers model (or a PEFT/DDP/compiled wrapper of one). Only this instance
            changes; other models of the same class, or built from the same config, do not.
        backend: ``"auto"`` (fastest that supports each layer), ``"flash_attn"``, ``"torch"``,
            ``"flex"`` or ``"sdpa"`` (the exact reference). A named backend that cannot serve a
            layer raises instead of falling back.
        check_inputs: validate collator-provided ``cu_seq_lens_*`` (one device sync per forward
            when they live on the GPU). ``False`` trusts them: zero syncs.

    Packed means: some row of ``position_ids`` restarts (``pos[t] != pos[t-1] + 1``), or the
    forward gets ``cu_seq_lens_q/k``. Anything else runs the upstream code unchanged.
    """
    check_versions()
    if backend != "auto" and backend not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {backend!r}; choose 'auto' or one of {sorted(BACKENDS)}.")
    hf_model = find_hf_model(model)
    options = PatchOptions(backend=backend, check_inputs=check_inputs)
    state: PatchState | None = vars(hf_model).get(STATE_ATTR)
    if state is not None:
        if state.options == options:
            return model
        unapply(hf_model)

    model_type = getattr(hf_model.config, "model_type", None)
    entry = lookup(model_type)
    if entry.refuse is not None:
        reason = entry.refuse(hf_model.config)
        if reason:
            raise UnsupportedArchitectureError(f"hf_varlen_patch cannot patch this {model_type} model: {reason}")
    _warn_untested(model_type)

    patcher = Patcher()
    try:
        _patch(hf_model, entry, options, patcher)
    except BaseException:
        patcher.undo()
        raise
    patcher.set_attr(hf_model, STATE_ATTR, PatchState(entry, options, patcher))
    return model


_WARNED: set[str] = set()


def _warn_untested(model_type: str) -> None:
    """One line per model_type and process when transformers lies outside what CI tests."""
    import transformers

    if is_tested() or model_type in _WARNED:
        return
    _WARNED.add(model_type)
    logger.warning(
        "hf_varlen_patch: CI tests transformers %s, not %s; run `hf-varlen-patch check %s` to confirm "
        "packed == separate here.",
        tested_range_text(),
        transformers.__version__,
        model_type,
    )


def _patch(hf_model: torch.nn.Module, entry: PatchEntry, options: PatchOptions, patcher: Patcher) -> None:
    base = hf_model.base_model
    targets = [(hf_model, True, base is hf_model)]
    if base is not hf_model:
        targets.append((base, False, True))
    passes_kwargs = {id(m): accepts_var_kwargs(m.forward) for m, _, _ in targets}
    generic = entry.generic(hf_model) if callable(entry.generic) else entry.generic
    if generic and not passes_kwargs[id(base)]:
        raise UnsupportedArchitectureError(
            f"{type(base).__name__}.forward takes no **kwargs on this transformers version, so the "
            f"boundaries cannot reach its attention; the {entry.family} entry needs a dedicated patch."
        )

    own_config(hf_model, patcher)
    if generic:
        for config in nested_configs(hf_model.config):
            original = config._attn_implementation or "eager"
            if parse_implementation(original) is not None:
                continue
            name = register_implementation(options.backend, original)
            patcher.set_attr(config, "_attn_implementation_internal", name)
    if entry.patch is not None:
        entry.patch(hf_model, patcher, options)
    for module, is_top, is_base in targets:
        wrapper = make_entry_wrapper(
            check_inputs=options.check_inputs,
            is_base=is_base,
            is_top=is_top,
            passes_kwargs=passes_kwargs[id(module)],
            shifts_labels=entry.shifts_labels,
        )
        patcher.wrap_method(module, "forward", wrapper)


def unapply(model: M) -> M:
    """Undo :func:`apply` on this instance exactly; a model that is not patched is returned as is."""
    hf_model = find_hf_model(model)
    state: PatchState | None = vars(hf_model).get(STATE_ATTR)
    if state is not None:
        state.patcher.undo()
    return model
