"""Helpers for entries whose attention (or position table) computes itself and whose layers get
neither keyword arguments nor ``position_ids`` (MVP, RoFormer, Blenderbot).

- the engine's :func:`~hf_varlen_patch.context.boundaries_for`, keyed on the hidden states a
  self-attention module gets: transformers 5.x's gradient checkpointing recomputes the class
  ``forward`` of a layer (no context), and post-norm layers hand their input to attention as is.
- :func:`wrap_bart_style_self_attention`: a BART-style self-attention module that computes
  itself (queries pre-scaled, ``q/k/v/out_proj``; MVP, TrOCR) attends through the varlen backend
  in packed calls.
- :func:`refuse_when_packed`: a module (cross-attention) that must not run in a packed forward.
- :func:`remember_padding` / :func:`sequence_positions`: each token's position within its own
  sequence, for position tables looked up inside the model. Padding tokens (``attention_mask ==
  0`` of the call :func:`remember_padding` watches, :func:`current_padding`) get position 0:
  nobody sees them, and a padding run longer than the table must not fail where every real
  sequence fits.
"""

from __future__ import annotations

import contextvars

import torch

from hf_varlen_patch.attention import varlen_attention
from hf_varlen_patch.backends import AttentionSpec
from hf_varlen_patch.boundaries import Boundaries
from hf_varlen_patch.context import boundaries_for
from hf_varlen_patch.errors import VarlenPatchError
from hf_varlen_patch.patching import Patcher, cache_of, call_as_kwargs, wrap_packed_calls

__all__ = [
    "wrap_bart_style_self_attention",
    "current_padding",
    "refuse_when_packed",
    "remember_padding",
    "sequence_positions",
]


def layer_call_boundaries(instance: torch.nn.Module, call: dict) -> Boundaries | None:
    """The boundaries of a self-attention call keyed on its hidden states (found again when
    transformers 5.x's checkpointing replays the layer's class ``forward`` outside the forward)."""
    return boundaries_for(key=call["hidden_states"], layer=instance)


def refuse_when_packed(patcher: Patcher, module: torch.nn.Module, what: str) -> None:
    """Make ``module`` raise in packed forwards (``what`` names what cannot be packed)."""

    def wrapper(wrapped, instance, args, kwargs):
        if boundaries_for() is not None:
            raise VarlenPatchError(f"{what} cannot be packed.")
        return wrapped(*args, **kwargs)

    patcher.wrap_method(module, "forward", wrapper)


#: The 2-D attention mask of the packed forward running now (None: no padding).
_PADDING: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("hf_varlen_padding", default=None)


def remember_padding(patcher: Patcher, module: torch.nn.Module) -> None:
    """Keep the 2-D ``attention_mask`` of ``module``'s packed calls for :func:`sequence_positions`."""

    def wrapper(wrapped, instance, args, kwargs):
        mask = call_as_kwargs(wrapped, args, kwargs).get("attention_mask")
        if boundaries_for() is None or not (isinstance(mask, torch.Tensor) and mask.ndim == 2):
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


def wrap_bart_style_self_attention(patcher: Patcher, module: torch.nn.Module, backend: str) -> None:
    """Packed calls of a BART-style self-attention module (queries pre-scaled by ``scaling``,
    ``q_proj/k_proj/v_proj/out_proj``) attend through the varlen backend; the boundaries by
    :func:`~hf_varlen_patch.context.boundaries_for` keyed on its hidden states, so 5.x checkpoint
    recomputation finds them."""

    def packed(wrapped, instance, call, boundaries):
        hidden = call["hidden_states"]
        if call.get("attn_prompt") is not None:
            raise VarlenPatchError("MVP prompts (use_prompt=True) cannot be packed.")
        batch, length, width = hidden.shape
        shape = (batch, length, instance.num_heads, instance.head_dim)
        q = (instance.q_proj(hidden) * instance.scaling).view(shape).transpose(1, 2)
        k = instance.k_proj(hidden).view(shape).transpose(1, 2)
        v = instance.v_proj(hidden).view(shape).transpose(1, 2)
        cache = cache_of(call)
        if cache is not None:
            cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache
            k, v = cache.update(k, v, instance.layer_idx)
        dropout = float(instance.dropout or 0.0) if instance.training else 0.0
        out = varlen_attention(backend, q, k, v, boundaries, AttentionSpec(causal=True, scale=1.0, dropout=dropout))
        return instance.out_proj(out.reshape(batch, length, width)), None

    wrap_packed_calls(patcher, module, "forward", packed, find=layer_call_boundaries)
