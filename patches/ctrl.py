"""CTRL: sinusoidal positions indexed by ``position_ids`` (embeddings scaled by sqrt(d_model)).

- transformers 5.x: attention goes through AttentionInterface (generic route).
- transformers 4.57: attention is the module-level ``scaled_dot_product_attention`` with a
  (T, T) triangle plus a 2-D padding mask, and the base forward's ``**kwargs`` are a no-op. The
  engine's 4-D placeholder mask would be reshaped as a padding mask there, so the base forward is
  wrapped to drop it in a packed forward, and every ``multi_head_attention`` is wrapped to call
  the varlen backend with the running forward's boundaries (layers tracked for checkpointing).
"""

from __future__ import annotations

import math
import sys
from functools import partial

from hf_varlen_patch.attention import varlen_attention
from hf_varlen_patch.backends import AttentionSpec
from hf_varlen_patch.context import BOUNDARIES_KWARG, boundaries_for
from hf_varlen_patch.patching import call_as_kwargs, track_layer, wrap_packed_calls
from hf_varlen_patch.registry import PatchEntry, register

from ._common import tiny_config


def _configs(model_type: str) -> dict:
    return {"default": tiny_config("ctrl", dff=96, resid_pdrop=0.0, embd_pdrop=0.0, max_position_embeddings=1024)}


def _legacy(model) -> bool:
    """4.57: no AttentionInterface (no module-level eager_attention_forward)."""
    return not hasattr(sys.modules[type(model.base_model).__module__], "eager_attention_forward")


def _without_placeholder(wrapped, instance, args, kwargs):
    if boundaries_for() is None:
        return wrapped(*args, **kwargs)
    call = call_as_kwargs(wrapped, args, kwargs)
    call["attention_mask"] = None  # the boundaries say everything; upstream would reshape the placeholder
    call.pop(BOUNDARIES_KWARG, None)
    return wrapped(**call)


def _packed_attention_forward(wrapped, instance, call, boundaries, *, backend: str):
    hidden_q = call["q"]
    batch = hidden_q.shape[0]
    q = instance.split_into_heads(instance.Wq(hidden_q), batch)
    k = instance.split_into_heads(instance.Wk(call["k"]), batch)
    v = instance.split_into_heads(instance.Wv(call["v"]), batch)
    past = call.get("layer_past")
    if past is not None:
        k, v = past.update(k, v, instance.layer_idx, {"cache_position": call.get("cache_position")})
    spec = AttentionSpec(causal=True, scale=1.0 / math.sqrt(k.shape[-1]))
    out = varlen_attention(backend, q, k, v, boundaries, spec)
    return instance.dense(out.reshape(batch, -1, instance.d_model_size)), None


def _patch(model, patcher, options) -> None:
    if not _legacy(model):
        return
    base = model.base_model
    patcher.wrap_method(base, "forward", _without_placeholder)
    for layer in base.h:
        attention = layer.multi_head_attention
        wrap_packed_calls(patcher, attention, "forward", partial(_packed_attention_forward, backend=options.backend))
        track_layer(patcher, layer)


register(
    PatchEntry(
        family="ctrl",
        model_types=("ctrl",),
        test_configs=_configs,
        routes_attention=lambda model: not _legacy(model),
        patch=_patch,
        notes="sinusoidal positions from position_ids; 4.57: legacy attention wrapped per instance",
    )
)
