"""XGLM: scaled word embeddings, sinusoidal positions (offset 2, zero row at ``padding_idx``) and
a hand-written attention that never goes through AttentionInterface (both transformers lines).

- Positions are indexed by ``position_ids``, so the restarting ones the patched forward passes
  are enough. transformers 4.57 adds the offset *in place* (``position_ids += 2``), shifting the
  caller's tensor for every later call (and the tensor the boundaries are registered against);
  the embedding gets a copy instead, in every call (the outputs of unpacked calls are unchanged).
- Self-attention (``self_attn`` of every layer) is wrapped on this instance: in a packed forward
  it projects q/k/v as upstream (q pre-scaled) and calls the varlen backend. The boundaries come
  from the ``varlen_boundaries`` kwarg (5.x) or the running forward (4.57, whose base forward
  takes no kwargs; layers are tracked for gradient checkpointing). Unpacked calls run upstream.
"""

from __future__ import annotations

from functools import partial

import torch

from hf_varlen_patch.attention import varlen_attention
from hf_varlen_patch.backends import AttentionSpec
from hf_varlen_patch.patching import cache_of, call_as_kwargs, track_layer, wrap_packed_calls
from hf_varlen_patch.registry import PatchEntry, register

from ._common import tiny_config


def _configs(model_type: str) -> dict:
    return {
        "default": tiny_config(
            "xglm", ffn_dim=96, dropout=0.0, activation_dropout=0.0, layerdrop=0.0, max_position_embeddings=1024
        )
    }


def _refuse(config) -> str | None:
    if getattr(config, "add_cross_attention", False):
        return "add_cross_attention=True: cross-attention over packed sequences is not supported."
    return None


def _copied_positions(wrapped, instance, args, kwargs):
    call = call_as_kwargs(wrapped, args, kwargs)
    positions = call.get("position_ids")
    if isinstance(positions, torch.Tensor):
        call["position_ids"] = positions.clone()
    return wrapped(**call)


def _packed_attention_forward(wrapped, instance, call, boundaries, *, backend: str):
    hidden = call["hidden_states"]
    batch, length, _ = hidden.shape
    shape = (batch, length, -1, instance.head_dim)
    q = (instance.q_proj(hidden) * instance.scaling).view(shape).transpose(1, 2)
    k = instance.k_proj(hidden).view(shape).transpose(1, 2)
    v = instance.v_proj(hidden).view(shape).transpose(1, 2)
    past = cache_of(call)
    if past is not None:
        past = getattr(past, "self_attention_cache", past)  # EncoderDecoderCache
        k, v = past.update(k, v, instance.layer_idx, {"cache_position": call.get("cache_position")})
    spec = AttentionSpec(causal=True, scale=1.0, dropout=float(instance.dropout or 0.0) if instance.training else 0.0)
    out = varlen_attention(backend, q, k, v, boundaries, spec)
    return instance.out_proj(out.reshape(batch, length, instance.embed_dim)), None


def _patch(model, patcher, options) -> None:
    base = model.base_model
    patcher.wrap_method(base.embed_positions, "forward", _copied_positions)
    handler = partial(_packed_attention_forward, backend=options.backend)
    for layer in base.layers:
        wrap_packed_calls(patcher, layer.self_attn, "forward", handler)
        track_layer(patcher, layer)


register(
    PatchEntry(
        family="xglm",
        model_types=("xglm",),
        test_configs=_configs,
        routes_attention=False,
        patch=_patch,
        refuse=_refuse,
        notes="scaled embeddings; sinusoidal positions (offset 2) from position_ids; own attention wrapped",
    )
)
