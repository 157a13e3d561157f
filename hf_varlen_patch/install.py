"""Patching one model instance with one registry entry, and the record that undoes it.

:func:`apply_entry` routes attention, installs the entry's patch and the entry wrappers, and keeps
a :class:`PatchState` on the instance; copies and pickles of a patched model are patched again.
``api.apply`` chooses the entry (registry, refusals, self-check) and calls it; the self-check
patches its twins with it directly.
"""

from __future__ import annotations

import copy
import copyreg
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .attention import parse_implementation, register_implementation
from .backends import AUTO_ORDER, BACKENDS
from .context import boundaries_for
from .errors import StalePatchError, UnsupportedArchitectureError, VarlenPatchError
from .heads import head_kind
from .loss import check_sequence_mean_supported, refuse_bypassed_loss, sequence_mean_loss_function
from .patching import (
    Patcher,
    accepts_argument,
    accepts_var_kwargs,
    carry_boundaries_through_checkpoints,
    make_entry_wrapper,
    nested_configs,
    own_config,
)
from .registry import PatchEntry, PatchOptions, lookup

__all__ = ["apply_entry", "find_hf_model", "is_patched", "PatchState", "STATE_ATTR", "check_route", "route_is_current"]

#: Instance attribute holding a patched model's :class:`PatchState`.
STATE_ATTR = "_hf_varlen_patch"


@dataclass
class PatchState:
    """What patched a model, with which options, and the record that undoes it."""

    entry: PatchEntry
    options: PatchOptions
    patcher: Patcher
    #: how a loaded pickle of the model is patched again (see :func:`apply_entry`)
    reapply: Callable[..., Any] | None = None


def find_hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers PreTrainedModel inside wrappers (PEFT, DDP, FSDP, torch.compile)."""
    from transformers import PreTrainedModel

    current = _wrapper_chain(model)[-1]
    if not isinstance(current, PreTrainedModel):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is not a transformers PreTrainedModel (nor a PEFT/DDP/compiled "
            "wrapper of one); hf_varlen_patch patches transformers models only."
        )
    return current


def _wrapper_chain(model: torch.nn.Module) -> list[torch.nn.Module]:
    """``model``, the wrappers inside it, and last what they wrap (the transformers model)."""
    from transformers import PreTrainedModel

    chain = [model]
    while not isinstance(chain[-1], PreTrainedModel) and len(chain) <= 8:
        current = chain[-1]
        if hasattr(current, "get_base_model"):
            current = current.get_base_model()
        elif isinstance(getattr(current, "module", None), torch.nn.Module):
            current = current.module
        elif isinstance(getattr(current, "_orig_mod", None), torch.nn.Module):
            current = current._orig_mod
        else:
            break
        chain.append(current)
    return chain


def is_patched(model: torch.nn.Module) -> bool:
    return STATE_ATTR in vars(find_hf_model(model))


def apply_entry(
    hf_model: torch.nn.Module,
    entry: PatchEntry,
    *,
    backend: str = "auto",
    check_inputs: bool = True,
    loss: str = "token_mean",
    unpad: bool = False,
    sequence_parallel: Any = None,
    reapply: Callable[..., Any] | None = None,
) -> None:
    """Patch ``hf_model`` with ``entry`` (no lookup, no refusal check, no self-check).

    ``reapply(model, **options)`` patches a pickled copy again when it is loaded (``apply``
    passes itself, so a loaded model is patched exactly like a new one); without it a loaded
    copy gets its registry entry again."""
    options = PatchOptions(
        backend=backend, check_inputs=check_inputs, loss=loss, unpad=unpad, sequence_parallel=sequence_parallel
    )
    patcher = Patcher()
    try:
        _patch(hf_model, entry, options, patcher)
    except BaseException:
        patcher.undo()
        raise
    patcher.set_attr(hf_model, STATE_ATTR, PatchState(entry, options, patcher, reapply))
    # copy.deepcopy (EMA models, TRL's reference model) and pickle look these up on the instance
    patcher.set_attr(hf_model, "__deepcopy__", functools.partial(_deepcopy_patched, hf_model))
    patcher.set_attr(hf_model, "__reduce_ex__", functools.partial(_reduce_patched, hf_model))


def _options_of(state: PatchState) -> dict:
    options = state.options
    return dict(
        backend=options.backend,
        check_inputs=options.check_inputs,
        loss=options.loss,
        unpad=options.unpad,
        sequence_parallel=options.sequence_parallel,
    )


def _deepcopy_patched(hf_model: torch.nn.Module, memo: dict) -> torch.nn.Module:
    """A deep copy of a patched model: its unpatched state copied (every module's
    ``__getstate__`` leaves the patch out, configs keep the user's edits), then patched with the
    same entry and options. The original is not touched, and the copy runs its own modules."""
    state: PatchState = vars(hf_model)[STATE_ATTR]
    cls = type(hf_model)
    copied = cls.__new__(cls)
    memo[id(hf_model)] = copied
    copied.__setstate__(copy.deepcopy(hf_model.__getstate__(), memo))
    _unroute_configs(copied)
    apply_entry(copied, state.entry, **_options_of(state), reapply=state.reapply)
    return copied


def _reduce_patched(hf_model: torch.nn.Module, protocol: int) -> tuple:
    """``pickle`` / ``torch.save`` of a patched model: its unpatched state, and the patch to
    re-apply when it is loaded (:func:`_restore_patched`)."""
    state: PatchState = vars(hf_model)[STATE_ATTR]
    model_type = getattr(hf_model.config, "model_type", None)
    # a process group belongs to this run: a loaded copy is patched without sequence parallel
    patch = {"model_type": model_type, **_options_of(state), "sequence_parallel": None}
    cls = type(hf_model)
    saved = {"state": hf_model.__getstate__(), "patch": patch, "reapply": state.reapply}
    return (copyreg.__newobj__, (cls,), saved, None, None, _restore_patched)


def _restore_patched(model: torch.nn.Module, saved: dict) -> None:
    """Unpickling a patched model: set its state, then apply the same patch (a registry entry, or
    the generic route after a self-check), so a loaded model is patched exactly like a new one."""
    model.__setstate__(saved["state"])
    _unroute_configs(model)
    patch = dict(saved["patch"])
    model_type = patch.pop("model_type")
    reapply = saved.get("reapply")
    try:
        if reapply is not None:
            reapply(model, **patch)
        else:
            apply_entry(model, lookup(model_type), **patch)
    except VarlenPatchError as err:
        raise type(err)(
            f"this {model_type} model was saved patched by hf_varlen_patch and cannot be patched again here: {err}"
        ) from err


def _unroute_configs(model: torch.nn.Module) -> None:
    """A copied or unpickled config still names the patched attention; name the original again."""
    for config in nested_configs(model.config):
        parsed = parse_implementation(getattr(config, "_attn_implementation_internal", None))
        if parsed is not None:
            config._attn_implementation_internal = parsed[1]


def _runs_a_backbone(hf_model: torch.nn.Module) -> bool:
    from transformers import PreTrainedModel

    inner = getattr(hf_model, "model", None)
    return isinstance(inner, PreTrainedModel) and inner is not hf_model


def _patch(hf_model: torch.nn.Module, entry: PatchEntry, options: PatchOptions, patcher: Patcher) -> None:
    base = hf_model.base_model
    targets = [(hf_model, True, base is hf_model)]
    if base is not hf_model:
        targets.append((base, False, True))
    elif _runs_a_backbone(hf_model):
        # transformers 4.x vision-language models are their own base model; callers (TRL's fused
        # log-prob head) run the inner ``model`` themselves, so it takes packed calls too
        targets.append((hf_model.model, False, True))
    from_context = entry.boundaries_from_context
    from_context = from_context(hf_model) if callable(from_context) else from_context
    passes_kwargs = {id(m): accepts_var_kwargs(m.forward) and not from_context for m, _, _ in targets}
    generic = entry.takes_generic_route(hf_model)
    if generic and not passes_kwargs[id(base)] and not from_context:
        raise UnsupportedArchitectureError(
            f"{type(base).__name__}.forward takes no **kwargs on this transformers version, so the "
            f"boundaries cannot reach its attention; the {entry.family} entry needs a dedicated patch."
        )

    own_config(hf_model, patcher)
    routes: list[tuple[Any, str]] = []
    if generic:
        configs = entry.attention_configs or nested_configs
        for config in configs(hf_model.config):
            original = config._attn_implementation or "eager"
            if parse_implementation(original) is not None:
                continue
            name = register_implementation(options.backend, original)
            # a later set_attn_implementation (the user's choice) survives unapply
            patcher.set_attr(config, "_attn_implementation_internal", name, unless_changed=True)
            routes.append((config, name))
    patcher.set_attr(hf_model, ROUTES_ATTR, tuple(routes))
    if entry.patch is not None:
        entry.patch(hf_model, patcher, options)
    carry_boundaries_through_checkpoints(patcher, hf_model)
    head = head_kind(hf_model)
    for module, is_top, is_base in targets:
        wrapper = make_entry_wrapper(
            check_inputs=options.check_inputs,
            is_base=is_base,
            is_top=is_top,
            passes_kwargs=passes_kwargs[id(module)],
            shifts_labels=entry.shifts_labels,
            rows_are_sequences=bool(entry.rows_are_sequences and entry.rows_are_sequences(hf_model.config)),
            takes_position_ids=accepts_argument(module.forward, "position_ids"),
            takes_seq_idx=accepts_argument(module.forward, "seq_idx"),
            head=head if is_top else "base",
            check_route=check_route if is_top else None,
            unpad=options.unpad,
            sequence_parallel=options.sequence_parallel,
        )
        patcher.wrap_method(module, "forward", wrapper)
    _resolve_backends(options.backend)
    _pin_default_loss(patcher, hf_model)
    if options.loss == "sequence_mean":
        check_sequence_mean_supported(hf_model, entry.shifts_labels)
        patcher.set_attr(hf_model, "_loss_function", sequence_mean_loss_function(boundaries_for))
        # Trainer then averages micro-batches instead of dividing by a global token count
        patcher.set_attr(hf_model, "accepts_loss_kwargs", False)
        refuse_bypassed_loss(patcher, hf_model)


#: Instance attribute: the (config, registered name) pairs whose attention the patch routes.
ROUTES_ATTR = "_hf_varlen_routes"


def check_route(hf_model: torch.nn.Module) -> None:
    """Raise :class:`StalePatchError` when attention no longer takes the patched route (e.g.
    ``set_attn_implementation`` after ``apply``): packed rows would leak with no error."""
    for config, name in vars(hf_model).get(ROUTES_ATTR, ()):
        current = config._attn_implementation_internal
        if current != name:
            raise StalePatchError(
                f"the attention implementation of this {type(hf_model).__name__} changed to {current!r} after "
                "hf_varlen_patch.apply, so packed rows would attend across their sequences. Call "
                "hf_varlen_patch.apply(model) again after changing it (unpacked calls then run the new "
                "implementation; output_attentions=True is refused in packed calls)."
            )


def route_is_current(hf_model: torch.nn.Module) -> bool:
    try:
        check_route(hf_model)
    except StalePatchError:
        return False
    return True


def _resolve_backends(name: str) -> None:
    """Look the kernels up now (imports, signatures), so compiled forwards never import."""
    for candidate in AUTO_ORDER if name == "auto" else [name]:
        if candidate in BACKENDS:
            BACKENDS[candidate].features()


def _pin_default_loss(patcher: Patcher, hf_model: torch.nn.Module) -> None:
    """Resolve the ``loss_function`` property once for models whose ``loss_type`` is unrecognised
    (GPT-2's LMHead class name): upstream re-resolves it, logging, at every forward, which is a
    graph break in every compiled step. The same function, so losses are unchanged."""
    from transformers.loss.loss_utils import LOSS_MAPPING

    if "_loss_function" in vars(hf_model) or getattr(hf_model, "loss_type", None) in LOSS_MAPPING:
        return
    try:
        resolved = hf_model.loss_function
    except AttributeError:
        return
    patcher.set_attr(hf_model, "_loss_function", resolved)
