"""Helpers for entries whose attention (or position table) computes itself and whose layers get
neither keyword arguments nor ``position_ids`` (MVP, RoFormer, Blenderbot).

- :func:`layer_boundaries`: the boundaries of such a module's call: the running packed
  forward's, or, when transformers 5.x's gradient checkpointing recomputes the class ``forward``
  of a layer (bypassing instance wrappers, so no context), the ones remembered for the very
  hidden-states tensor that call passes again (post-norm layers hand their input to attention
  as is). A recomputation that finds none after a packed forward (``use_reentrant=True``
  detaches the inputs) raises instead of attending across sequences.
- :func:`refuse_when_packed`: a module (cross-attention) that must not run in a packed forward.
- :func:`remember_padding` / :func:`sequence_positions`: each token's position within its own
  sequence, for position tables looked up inside the model. Padding tokens (``attention_mask ==
  0`` of the call :func:`remember_padding` watches, :func:`current_padding`) get position 0:
  nobody sees them, and a padding run longer than the table must not fail where every real
  sequence fits.
"""

from __future__ import annotations

import contextvars
import weakref
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from hf_varlen_patch.boundaries import Boundaries
from hf_varlen_patch.errors import VarlenPatchError
from hf_varlen_patch.patching import Patcher, call_as_kwargs, current_boundaries

__all__ = ["current_padding", "layer_boundaries", "refuse_when_packed", "remember_padding", "sequence_positions"]


_BY_INPUT = WeakIdKeyDictionary()
_LAST_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layer_boundaries(module: torch.nn.Module, hidden_states: Any) -> Boundaries | None:
    """The boundaries of ``module``'s call on ``hidden_states`` (None: an unpacked call)."""
    keyed = isinstance(hidden_states, torch.Tensor)
    boundaries = current_boundaries()
    if boundaries is not None:
        if keyed:
            _BY_INPUT[hidden_states] = boundaries
        _LAST_PACKED[module] = True
        return boundaries
    found = _BY_INPUT.get(hidden_states) if keyed else None
    if found is not None:
        return found
    if _LAST_PACKED.get(module, False) and torch._C._current_graph_task_id() != -1:
        raise VarlenPatchError(
            f"{type(module).__name__} is recomputed by reentrant gradient checkpointing, which hides the packing "
            "boundaries; enable checkpointing with use_reentrant=False."
        )
    _LAST_PACKED[module] = False
    return None


def refuse_when_packed(patcher: Patcher, module: torch.nn.Module, what: str) -> None:
    """Make ``module`` raise in packed forwards (``what`` names what cannot be packed)."""

    def wrapper(wrapped, instance, args, kwargs):
        if current_boundaries() is not None:
            raise VarlenPatchError(f"{what} cannot be packed.")
        return wrapped(*args, **kwargs)

    patcher.wrap_method(module, "forward", wrapper)


#: The 2-D attention mask of the packed forward running now (None: no padding).
_PADDING: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("hf_varlen_padding", default=None)


def remember_padding(patcher: Patcher, module: torch.nn.Module) -> None:
    """Keep the 2-D ``attention_mask`` of ``module``'s packed calls for :func:`sequence_positions`."""

    def wrapper(wrapped, instance, args, kwargs):
        mask = call_as_kwargs(wrapped, args, kwargs).get("attention_mask")
        if current_boundaries() is None or not (isinstance(mask, torch.Tensor) and mask.ndim == 2):
            return wrapped(*args, **kwargs)
        token = _PADDING.set(mask)
        try:
            return wrapped(*args, **kwargs)
        finally:
            _PADDING.reset(token)

    patcher.wrap_method(module, "forward", wrapper)


def current_padding() -> torch.Tensor | None:
    """The 2-D ``attention_mask`` :func:`remember_padding` kept for the packed forward running now."""
    return _PADDING.get()


def sequence_positions(boundaries: Boundaries, device: torch.device) -> torch.Tensor:
    """(B, T) positions within each sequence, 0 on padding; memoised per forward."""
    key = ("sequence_positions", str(device))
    if key not in boundaries.cache:
        positions = boundaries.position_ids().to(device)
        padding = _PADDING.get()
        if padding is not None and padding.shape == positions.shape:
            positions = positions.masked_fill(padding.to(device) == 0, 0)
        boundaries.cache[key] = positions
    return boundaries.cache[key]
