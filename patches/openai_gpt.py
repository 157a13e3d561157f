"""OpenAI GPT (``openai-gpt``): learned positions indexed by ``position_ids``, and an attention
class that computes itself (``Attention._attn``: scores times a (T, T) triangle buffer, plus a
padding mask), outside the AttentionInterface on both transformers lines.

Upstream's triangle spans the whole row, so packed sequences see each other. In a packed
forward (boundaries from the running forward's context; blocks tracked for gradient
checkpointing) every ``_attn`` attends through the varlen backend instead, with upstream's
scaling (1 / sqrt(head_dim) when ``scale``) and attention dropout; the base forward gets no mask
there (5.x would turn the engine's 4-D placeholder into a dense one). Unpacked calls run upstream.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

from hf_varlen_patch.attention import is_packed_mask_placeholder, varlen_attention
from hf_varlen_patch.backends import AttentionSpec
from hf_varlen_patch.context import BOUNDARIES_KWARG
from hf_varlen_patch.patching import Patcher, call_as_kwargs, track_layer, wrap_packed_calls
from hf_varlen_patch.registry import PatchEntry, PatchOptions, register


def _configs(model_type: str) -> dict:
    from hf_varlen_patch.twins import tiny_config

    # 1024 positions: padding positions of the property tests ("continue") reach past 512.
    return {"twin": tiny_config(model_type, n_positions=1024)}


def _without_placeholder(wrapped, instance, args, kwargs):
    """The base forward of a packed call: no mask (upstream would broadcast the placeholder)."""
    call = call_as_kwargs(wrapped, args, kwargs)
    if not is_packed_mask_placeholder(call.get("attention_mask")):
        return wrapped(*args, **kwargs)
    call["attention_mask"] = None
    call.pop(BOUNDARIES_KWARG, None)
    return wrapped(**call)


def _packed_attn(wrapped, instance, call, boundaries, *, backend: str):
    query, key, value = call["q"], call["k"].transpose(-1, -2), call["v"]  # upstream passes k as (B, H, D, T)
    spec = AttentionSpec(
        causal=True,
        scale=1.0 / math.sqrt(value.size(-1)) if instance.scale else 1.0,
        dropout=instance.attn_dropout.p if instance.training else 0.0,
    )
    out = varlen_attention(backend, query, key, value, boundaries, spec)  # (B, T, H, D)
    return [out.transpose(1, 2)]  # (B, H, T, D), as merge_heads takes it


def _patch(model: Any, patcher: Patcher, options: PatchOptions) -> None:
    base = model.base_model
    patcher.wrap_method(base, "forward", _without_placeholder)
    for block in base.h:
        wrap_packed_calls(patcher, block.attn, "_attn", partial(_packed_attn, backend=options.backend))
        track_layer(patcher, block)


register(
    PatchEntry(
        family="openai_gpt",
        model_types=("openai-gpt",),
        test_configs=_configs,
        routes_attention=False,
        patch=_patch,
        notes="learned positions from position_ids; own attention (_attn) wrapped per instance",
    )
)
