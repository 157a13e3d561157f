"""GPT-NeoX-Japanese: (partial) rotary from ``position_ids``, and an attention class that computes
itself (``_attn``: ``baddbmm`` scores plus the layer's mask), outside the AttentionInterface on
both transformers lines.

Upstream's mask is a causal mask over the whole row (with the default cache, and always on
4.57), so packed sequences see each other. Every attention module receives the ``position_ids``
tensor the patched forward registered its boundaries against, so on this instance:

- ``forward`` is wrapped: in a packed call (boundaries found for its ``position_ids``, or the
  running forward's) it runs upstream's forward (projections, rotary, cache update) with the
  boundaries in a context variable; unpacked calls run it untouched;
- ``_attn`` is wrapped: under those boundaries it attends through the varlen backend (scores /
  sqrt(head_size), attention dropout) and returns the (B, H, T, D) output ``_merge_heads`` takes.

On 4.57 (whose base model takes no ``**kwargs``) the legacy ``_update_causal_mask`` is skipped in
packed forwards, so no (T, T) mask is built for layers that ignore it. Length-dependent rotary
scalings are refused.
"""

from __future__ import annotations

import contextvars
from functools import partial
from typing import Any

import torch

from hf_varlen_patch.attention import varlen_attention
from hf_varlen_patch.backends import AttentionSpec
from hf_varlen_patch.boundaries import Boundaries
from hf_varlen_patch.context import boundaries_for
from hf_varlen_patch.patching import Patcher, call_as_kwargs, wrap_packed_calls
from hf_varlen_patch.registry import PatchEntry, PatchOptions, register

from ._rope import refuse_length_dependent_rope

#: (attention module, boundaries) of the packed attention forward running now.
_PACKED: contextvars.ContextVar[tuple[torch.nn.Module, Boundaries] | None] = contextvars.ContextVar(
    "hf_varlen_gpt_neox_japanese_packed", default=None
)


def _packed_forward(wrapped, instance, call, boundaries):
    token = _PACKED.set((instance, boundaries))
    try:
        return wrapped(**call)
    finally:
        _PACKED.reset(token)


def _packed_attn(wrapped, instance, args, kwargs, *, backend: str):
    state = _PACKED.get()
    if state is None or state[0] is not instance:
        return wrapped(*args, **kwargs)
    call = call_as_kwargs(wrapped, args, kwargs)
    spec = AttentionSpec(
        causal=True,
        scale=1.0 / instance.norm_factor,
        dropout=instance.attention_dropout.p if instance.training else 0.0,
    )
    out = varlen_attention(backend, call["query"], call["key"], call["value"], state[1], spec)  # (B, T, H, D)
    return out.transpose(1, 2), None  # (B, H, T, D), as _merge_heads takes it


def _no_mask_when_packed(wrapped, instance, args, kwargs):
    """4.57: packed attention ignores the mask, so the legacy builder does not make a (T, T) one."""
    if boundaries_for() is not None:
        return None
    return wrapped(*args, **kwargs)


def _patch(model: Any, patcher: Patcher, options: PatchOptions) -> None:
    base = model.base_model
    if callable(getattr(base, "_update_causal_mask", None)):
        patcher.wrap_method(base, "_update_causal_mask", _no_mask_when_packed)
    for layer in base.layers:
        patcher.wrap_method(layer.attention, "_attn", partial(_packed_attn, backend=options.backend))
        wrap_packed_calls(patcher, layer.attention, "forward", _packed_forward)


register(
    PatchEntry(
        family="gpt_neox_japanese",
        model_types=("gpt_neox_japanese",),
        routes_attention=False,
        patch=_patch,
        refuse=refuse_length_dependent_rope,
        notes="rotary from position_ids; own attention (forward and _attn) wrapped per instance",
    )
)
