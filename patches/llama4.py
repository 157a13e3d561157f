"""Llama 4 text decoder: chunked-attention layers and NoPE-layer temperature tuning.

- Layers of type ``chunked_attention`` attend within chunks of ``attention_chunk_size`` tokens
  counted from the sequence start; upstream builds that as a mask, which packed attention does
  not use, so those layers get :data:`~hf_varlen_patch.attention.CHUNK_KWARG` and the engine cuts
  every sequence into chunks.
- NoPE layers with ``attn_temperature_tuning`` scale queries by a factor of the token's position,
  which upstream takes from an ``arange`` over the row; in a packed forward their queries are
  rescaled to the factor of the position within the sequence.
"""

from __future__ import annotations

import contextvars

import torch

from hf_varlen_patch.attention import CHUNK_KWARG
from hf_varlen_patch.context import BOUNDARIES_KWARG
from hf_varlen_patch.registry import PatchEntry, register

from ._legacy_attention import pass_boundaries
from ._rope import refuse_length_dependent_rope


def _temperature(positions: torch.Tensor, attn: torch.nn.Module) -> torch.Tensor:
    return torch.log1p(torch.floor((positions.float() + 1.0) / attn.floor_scale)) * attn.attn_scale + 1.0


_PACKED: contextvars.ContextVar = contextvars.ContextVar("hf_varlen_llama4_packed", default=None)


def _rescale_queries(attn: torch.nn.Module, patcher) -> None:
    """Scale ``q_proj``'s output by temperature(sequence position) / temperature(row position), so
    that upstream's row-position factor, applied next, leaves the sequence-position one. The
    attention module's call (replayed by gradient checkpointing) carries the boundaries."""

    def attention(wrapped, instance, args, kwargs):
        boundaries = kwargs.get(BOUNDARIES_KWARG)
        if boundaries is None:
            return wrapped(*args, **kwargs)
        token = _PACKED.set((instance, boundaries))
        try:
            return wrapped(*args, **kwargs)
        finally:
            _PACKED.reset(token)

    def q_proj(wrapped, instance, args, kwargs):
        out = wrapped(*args, **kwargs)
        state = _PACKED.get()
        if state is None or state[0] is not attn:
            return out
        boundaries = state[1]
        batch, length = boundaries.shape
        row = torch.arange(length, device=out.device).expand(batch, length)
        factor = _temperature(boundaries.position_ids().to(out.device), attn) / _temperature(row, attn)
        return out * factor.to(out.dtype).unsqueeze(-1)

    patcher.wrap_method(attn.q_proj, "forward", q_proj)
    patcher.wrap_method(attn, "forward", attention)


def _patch(model, patcher, options) -> None:
    config = model.config.get_text_config()
    layers = [m for m in model.modules() if hasattr(m, "self_attn") and hasattr(m, "layer_idx")]
    for layer in layers:
        if config.layer_types[layer.layer_idx] == "chunked_attention":
            size = config.attention_chunk_size
            pass_boundaries(patcher, layer.self_attn, extra=lambda _m, _s=size: {CHUNK_KWARG: _s})
        attn = layer.self_attn
        if attn.attn_temperature_tuning and not attn.use_rope:
            _rescale_queries(attn, patcher)


# the twin keeps a chunked layer and a NoPE layer, with a chunk and a temperature floor that the
# test lengths cross

register(
    PatchEntry(
        family="llama4",
        model_types=("llama4_text",),
        refuse=refuse_length_dependent_rope,
        patch=_patch,
        twin_overrides={"llama4_text": {"floor_scale": 4, "attention_chunk_size": 8}},
        notes="chunked-attention layers cut per sequence; NoPE temperature tuning per sequence position",
    )
)
