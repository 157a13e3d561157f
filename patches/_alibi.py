"""Shared pieces of the ALiBi families (BLOOM, Falcon, MPT).

None of these models routes attention through transformers' AttentionInterface: their attention
modules compute the scores themselves, with an ALiBi bias that the base model builds once from
the whole row (so it, and the causal mask, span every sequence of a packed row). The family
modules wrap the attention modules' ``forward`` on the instance; in a packed forward the wrapper
projects q, k, v exactly as upstream does and calls the varlen backend with per-sequence ALiBi
(``AttentionSpec.alibi_slopes``), otherwise it runs the original forward untouched.

ALiBi equivalence: upstream's bias is ``slope * key_position`` (BLOOM, Falcon) or
``slope * (key_position - last_position)`` (MPT), constant along each query row plus
``-slope * (i - j)``. Under softmax a per-query constant cancels, so both equal the backends'
``-slope * |i - j|`` bias inside one sequence *because attention is causal* (every key j <= i).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hf_varlen_patch.attention import packed_mask_placeholder
from hf_varlen_patch.boundaries import Boundaries
from hf_varlen_patch.calls import batch_shape
from hf_varlen_patch.context import BOUNDARIES_KWARG, boundaries_for
from hf_varlen_patch.errors import VarlenPatchError
from hf_varlen_patch.patching import call_as_kwargs


def recall(tensor: Any, hidden_states: torch.Tensor) -> Boundaries | None:
    """The boundaries tied to ``tensor`` (the ALiBi tensor the base model hands every block, by
    :func:`~hf_varlen_patch.context.remember`), for a layer that gets no position_ids.

    The lookup is by identity: the ALiBi tensor travels as a keyword argument of the blocks, so
    gradient-checkpoint recomputation (transformers checkpoints ``partial(forward, **kwargs)``,
    reentrant or not, 4.57 or 5.x) passes the same object again and finds the same boundaries.
    None outside a packed forward (the layer then runs upstream's code).
    """
    boundaries = boundaries_for(key=tensor)
    if boundaries is not None and tuple(hidden_states.shape[:2]) != tuple(boundaries.shape):
        raise VarlenPatchError(
            f"a packed forward of {boundaries.shape} tokens reached an attention layer with "
            f"{tuple(hidden_states.shape[:2])} tokens; packed inputs need an empty cache."
        )
    return boundaries


def recall_by(name: str) -> Callable[[Any, dict], Boundaries | None]:
    """``find`` for :func:`~hf_varlen_patch.patching.wrap_packed_calls`: the boundaries tied to the
    call's ALiBi tensor (its argument ``name``), checked against the call's hidden states."""
    return lambda _instance, call: recall(call.get(name), call["hidden_states"])


def update_cache(past: Any, key: torch.Tensor, value: torch.Tensor, layer_idx: int, call: dict, **extra):
    """``past.update`` called as upstream calls it: 4.57 layers pass ``cache_position`` (and the
    rotary ``sin``/``cos``) in ``cache_kwargs``, 5.x layers pass no cache kwargs."""
    if past is None:
        return key, value
    if "cache_position" in call:
        return past.update(key, value, layer_idx, {"cache_position": call["cache_position"], **extra})
    return past.update(key, value, layer_idx)


class SlopeCache:
    """Per-device memo of a model's ALiBi slopes (float32, one per query head)."""

    def __init__(self, compute):
        self._compute = compute
        self._by_device: dict[torch.device, torch.Tensor] = {}

    def __call__(self, device: torch.device) -> torch.Tensor:
        slopes = self._by_device.get(device)
        if slopes is None:
            with torch.no_grad():
                slopes = self._compute(device).detach().to(device=device, dtype=torch.float32).contiguous()
            self._by_device[device] = slopes
        return slopes


def packed_mask_wrapper(*, placeholder: bool):
    """A wrapper around a base model's ``forward`` that takes neither ``position_ids`` nor usable
    kwargs (BLOOM, MPT). In a packed forward it drops the ``varlen_boundaries``/``position_ids``
    keywords, which these forwards ignore (5.x) or reject (BLOOM on 4.57), and replaces the
    caller's mask: by the zero-memory placeholder where the base model passes a 4-D mask through
    (``placeholder=True``; no (T, T) mask is built), else by None (no padding: the attention
    wrappers take everything from the boundaries). Unpacked calls run untouched."""

    def wrapper(wrapped, instance, args, kwargs):
        boundaries = boundaries_for()
        if boundaries is None and BOUNDARIES_KWARG not in kwargs:
            return wrapped(*args, **kwargs)
        call = call_as_kwargs(wrapped, args, kwargs)
        boundaries = call.pop(BOUNDARIES_KWARG, None) or boundaries
        shape = batch_shape(call)
        if boundaries is None or shape != tuple(boundaries.shape):
            return wrapped(*args, **kwargs)
        call.pop("position_ids", None)
        call["attention_mask"] = packed_mask_placeholder(shape[0], shape[1], boundaries.device) if placeholder else None
        return wrapped(**call)

    return wrapper


def drop_packed_kwargs_wrapper(wrapped, instance, args, kwargs):
    """Around a head model's ``forward`` whose ``**kwargs`` reject unknown names (BLOOM on 4.57
    raises on anything but ``position_ids``, which it warns about): in a packed forward, drop the
    ``varlen_boundaries`` and derived ``position_ids`` keywords; BLOOM uses neither."""
    if BOUNDARIES_KWARG not in kwargs:
        return wrapped(*args, **kwargs)
    kwargs = dict(kwargs)
    kwargs.pop(BOUNDARIES_KWARG)
    kwargs.pop("position_ids", None)
    return wrapped(*args, **kwargs)
