"""GPT-J and CodeGen: rotary (partial, ``rotary_dim``) from ``position_ids``, attention in the
module's own ``_attn`` method up to transformers 5.23; from 5.24 through the AttentionInterface
(the generic route).

Up to 5.23 the attention classes are picked by name at construction
(``GPTJ_ATTENTION_CLASSES``; CodeGen has one class) and never call the AttentionInterface, and
the 4.57 GPT-J base model takes no ``**kwargs``. What does reach every attention module is the
``position_ids`` tensor the patched forward registered, so on this instance:

- ``forward`` is wrapped: in a packed forward (boundaries found for its ``position_ids``) it runs
  the eager class's forward (projections, rotary, cache update as upstream) with the
  boundaries in a context variable; otherwise the original forward, untouched;
- ``_attn`` is wrapped: under those boundaries it runs the varlen backend instead of the
  (T, T) softmax and returns the (B, H, T, D) output ``_merge_heads`` expects.

:func:`patch_attn_method` is shared with GPT-Neo (``patches/gpt_neo.py``), whose attention has
the same ``_attn`` method but sees no ``position_ids``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from hf_varlen_patch.attention import varlen_attention
from hf_varlen_patch.backends import AttentionSpec
from hf_varlen_patch.boundaries import Boundaries
from hf_varlen_patch.context import boundaries_for
from hf_varlen_patch.guards import refuse_unpackable
from hf_varlen_patch.patching import call_as_kwargs, wrap_packed_calls
from hf_varlen_patch.registry import PatchEntry, register

from ._common import tiny_config

#: (attention module, boundaries) of the packed attention forward running now.
_PACKED: contextvars.ContextVar[tuple[torch.nn.Module, Boundaries] | None] = contextvars.ContextVar(
    "hf_varlen_gptj_packed", default=None
)


def _eager_class(module: torch.nn.Module) -> type:
    """The class that defines ``_attn`` (the eager one; flash-attention classes subclass it)."""
    return next(cls for cls in type(module).__mro__ if "_attn" in vars(cls))


def _packed_forward(wrapped, instance, call, boundaries):
    eager = _eager_class(instance)
    token = _PACKED.set((instance, boundaries))
    try:
        if eager is type(instance):
            return wrapped(**call)
        return eager.forward(instance, **call)  # e.g. GPTJFlashAttention2: its eager parent
    finally:
        _PACKED.reset(token)


def _packed_attn(wrapped, instance, args, kwargs, *, backend: str, scale: float, window: int | None):
    state = _PACKED.get()
    if state is None or state[0] is not instance:
        return wrapped(*args, **kwargs)
    call = call_as_kwargs(wrapped, args, kwargs)
    refuse_unpackable(call)
    value = call["value"]
    # upstream upcasts q, k to fp32 for the scores only; the kernels take one dtype (value's)
    query, key = call["query"].to(value.dtype), call["key"].to(value.dtype)
    dropout = instance.attn_dropout.p if instance.training else 0.0
    spec = AttentionSpec(causal=True, scale=scale, window=window, dropout=dropout)
    out = varlen_attention(backend, query, key, value, state[1], spec)  # (B, T, H, D)
    return out.transpose(1, 2), None  # (B, H, T, D), as _merge_heads takes it


def patch_attn_method(
    patcher: Any,
    module: torch.nn.Module,
    *,
    backend: str,
    scale: float,
    window: int | None,
    find: Callable[[dict], Boundaries | None],
) -> None:
    """Route one attention module's ``_attn`` to the varlen backend in packed forwards.

    ``find(call)`` returns the boundaries of a call of ``module.forward`` (its arguments by
    name), or None for an unpacked call, which then runs upstream's code unchanged.
    """
    patcher.wrap_method(module, "_attn", partial(_packed_attn, backend=backend, scale=scale, window=window))
    wrap_packed_calls(patcher, module, "forward", _packed_forward, find=lambda _instance, call: find(call))


def _by_positions(call: dict) -> Boundaries | None:
    return boundaries_for(call)


def _legacy(model) -> bool:
    """Up to 5.23 the attention computes itself in ``_attn``; from 5.24 it calls the
    AttentionInterface (and the generic route is all it needs)."""
    return hasattr(model.base_model.h[0].attn, "_attn")


def _patch(model, patcher, options) -> None:
    if not _legacy(model):
        return
    for block in model.base_model.h:
        attn = block.attn
        patch_attn_method(
            patcher,
            attn,
            backend=options.backend,
            scale=1.0 / float(attn.scale_attn),  # both divide the scores by sqrt(head_dim)
            window=None,
            find=_by_positions,
        )


def _configs(model_type: str) -> dict:
    # head_dim 16; rotary_dim 8 < head_dim exercises the partial rotary (GPT-J 6B: 64 of 256).
    # The config default rotary_dim=64 exceeds this head_dim and breaks upstream itself.
    return {
        "partial_rotary": tiny_config(
            model_type,
            rotary_dim=8,
            n_inner=96,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
        )
    }


register(
    PatchEntry(
        family="gptj",
        model_types=("gptj", "codegen"),
        test_configs=_configs,
        routes_attention=lambda model: not _legacy(model),
        patch=_patch,
        notes="partial rotary from position_ids; up to 5.23 attention modules' forward and _attn wrapped per "
        "instance, from 5.24 attention via AttentionInterface",
    )
)
