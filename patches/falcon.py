"""Falcon: rotary or ALiBi, old/new decoder architecture, multi-query or grouped KV heads.

Falcon's attention classes are picked by name at construction (``FALCON_ATTENTION_CLASSES``) and
compute attention themselves, so the generic route does not apply on either version. Each
attention module's ``forward`` is wrapped on the instance: in a packed forward (its
``position_ids`` are the ones the entry wrapper registered) it projects and splits q, k, v as
upstream does, applies rotary (rotary models) and calls the varlen backend; otherwise it runs
the original forward.

ALiBi (``alibi=True``, the RW models): upstream adds the bias to the *unscaled* scores and then
multiplies by ``inv_norm_factor`` (eager: ``(qk + alibi) * inv_norm_factor``; sdpa: the mask
holds ``alibi / sqrt(head_dim)``), and builds the slopes in bfloat16
(``slopes.bfloat16() * positions``). The spec therefore gets ``bf16(slope) * inv_norm_factor``
with ``scale=inv_norm_factor``; the slopes are read off upstream's own ``build_alibi_tensor``.
Upstream also rounds each ``slope * position`` product to bfloat16; with a power-of-two head
count up to 8 (power-of-two slopes) that rounding is exact, otherwise packed and unpacked runs
differ by upstream's bf16 rounding of its own bias (which also differs between positions of an
unpacked row). Upstream's eager branch (``attn_implementation='eager'``) adds the bias twice: to
the scores and again through the mask, into which the base model merged ``alibi /
sqrt(head_dim)``; packed runs reproduce that (slopes doubled) and ``apply`` logs a warning. With
flash attention upstream raises on ALiBi, so that combination is refused. Attention dropout
applies only with ALiBi, as upstream.

In a packed ALiBi forward the base model runs with ``use_alibi`` off for the duration of the
call, so it does not build the row-wide ALiBi tensor and its (B, H, T, T) additive mask that the
wrapped attention would ignore.

From transformers 5.25 ``FalconAttention`` splits q, k, v inline (no ``_split_heads``), applies
rotary, updates the cache and calls the AttentionInterface; both branches add the ALiBi bias once,
through the mask. There the packed wrapper runs upstream's own forward and replaces only the
attention function it looks up (:func:`_attention_function`, reached through the layer's config
for the duration of the call): the varlen backend with per-sequence ALiBi.
"""

from __future__ import annotations

import logging
import sys
from functools import partial
from typing import Any

import torch

from hf_varlen_patch.attention import varlen_attention
from hf_varlen_patch.backends import AttentionSpec
from hf_varlen_patch.context import BOUNDARIES_KWARG, boundaries_for
from hf_varlen_patch.patching import call_as_kwargs, wrap_packed_calls
from hf_varlen_patch.registry import PatchEntry, register

from ._alibi import SlopeCache, update_cache

logger = logging.getLogger("hf_varlen_patch")


def _config(**overrides):
    from transformers import AutoConfig

    kwargs = dict(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_hidden_size=96,
        max_position_embeddings=512,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return AutoConfig.for_model("falcon", **kwargs)


def _configs(model_type: str) -> dict:
    return {
        # Falcon-40B/180B layout: grouped KV heads, two layer norms, parallel attention + MLP.
        "rotary_new_arch": _config(new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True),
        # Falcon-7B layout: one shared KV head, parallel attention + MLP.
        "rotary_mqa_parallel": _config(new_decoder_architecture=False, multi_query=True, parallel_attn=True),
        # Rotary with full multi-head attention and sequential attention -> MLP.
        "rotary_mha_sequential": _config(new_decoder_architecture=False, multi_query=False, parallel_attn=False),
        # ALiBi with the new decoder architecture (grouped KV heads), eager attention (which
        # adds the ALiBi bias twice upstream, see the module docstring).
        "alibi_new_arch_eager": _config(
            alibi=True, new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True, attn_implementation="eager"
        ),
        # Falcon-RW layout: ALiBi, old architecture, multi-head, sequential, biases.
        "alibi_rw": _config(
            alibi=True, new_decoder_architecture=False, multi_query=False, parallel_attn=False, bias=True
        ),
    }


def _alibi_slopes(model) -> SlopeCache:
    """bf16(slope) per head, exactly as upstream's build_alibi_tensor makes them (position 1)."""
    modeling = sys.modules[type(model.base_model).__module__]
    num_heads = model.config.num_attention_heads

    def compute(device):
        ones = torch.ones((1, 2), dtype=torch.long, device=device)
        alibi = modeling.build_alibi_tensor(ones, num_heads, torch.float32)  # (heads, 1, 2): slope * [0, 1]
        return alibi[:, 0, 1]

    return SlopeCache(compute)


def _packed_attention_forward(wrapped, instance, call, boundaries, *, backend: str, slopes: SlopeCache):
    modeling = sys.modules[type(instance).__module__]
    hidden = call["hidden_states"]
    batch, length, _ = hidden.shape
    heads, head_dim = instance.num_heads, instance.head_dim
    kv_heads = heads if instance.new_decoder_architecture else instance.num_kv_heads
    query, key, value = instance._split_heads(instance.query_key_value(hidden))
    query = query.transpose(1, 2).reshape(batch, heads, length, head_dim)
    key = key.transpose(1, 2).reshape(batch, kv_heads, length, head_dim)
    value = value.transpose(1, 2).reshape(batch, kv_heads, length, head_dim)

    alibi = bool(instance.config.alibi)
    extra = {}
    if not alibi:
        cos, sin = call["position_embeddings"]
        query, key = modeling.apply_rotary_pos_emb(query, key, cos, sin)
        extra = {"sin": sin, "cos": cos}
    key, value = update_cache(call.get("layer_past"), key, value, instance.layer_idx, call, **extra)
    if instance.new_decoder_architecture and heads != instance.num_kv_heads:
        # _split_heads broadcast each KV head over its query group (heads g*r .. g*r + r-1);
        # keep one copy per group so the backend runs grouped-query attention instead.
        group = heads // instance.num_kv_heads
        key, value = key[:, ::group], value[:, ::group]

    scale = instance.inv_norm_factor
    if alibi:
        # upstream's sdpa branch adds the bias once (in the mask); its eager branch adds it to the
        # scores and again through the mask, into which the base model merged it.
        times = 1.0 if instance.config._attn_implementation == "sdpa" else 2.0
        spec = AttentionSpec(
            causal=True,
            scale=scale,
            alibi_slopes=slopes(query.device) * (scale * times),
            dropout=instance.attention_dropout.p if instance.training else 0.0,
        )
    else:
        spec = AttentionSpec(causal=True, scale=scale)  # upstream: no attention dropout without ALiBi
    out = varlen_attention(backend, query, key, value, boundaries, spec)
    return instance.dense(out.reshape(batch, length, heads * head_dim)), None


#: The AttentionInterface name of :func:`_attention_function` and the kwarg that carries its
#: (backend, ALiBi slopes or None) to it.
IMPLEMENTATION = "hf_varlen_falcon"
_SPEC_KWARG = "hf_varlen_falcon_spec"


def _attention_function(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Packed attention of a transformers 5.25+ FalconAttention: q (B, H, T, D), k/v (B, Hk, T, D)
    after rotary and cache, as upstream hands them to its attention function. Upstream adds the
    ALiBi bias ``bf16(slope) * position / sqrt(head_dim)`` to the scaled scores (eager and sdpa)."""
    backend, slopes = kwargs[_SPEC_KWARG]
    spec = AttentionSpec(
        causal=True,
        scale=scaling,
        dropout=float(dropout or 0.0),
        alibi_slopes=None if slopes is None else slopes * module.inv_norm_factor,
    )
    return varlen_attention(backend, query, key, value, kwargs[BOUNDARIES_KWARG], spec), None


class _RoutedConfig:
    """A layer's config whose attention implementation reads :data:`IMPLEMENTATION`."""

    _attn_implementation = IMPLEMENTATION

    def __init__(self, config: Any) -> None:
        self._config = config

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def _register_attention_function() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if IMPLEMENTATION not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        ALL_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, _attention_function)


def _packed_interface_forward(wrapped, instance, call, boundaries, *, backend: str, slopes: SlopeCache):
    """transformers 5.25+: upstream's forward, its attention function swapped for the varlen one."""
    alibi = slopes(call["hidden_states"].device) if instance.config.alibi else None
    config = instance.config
    instance.config = _RoutedConfig(config)
    try:
        return wrapped(**{**call, BOUNDARIES_KWARG: boundaries, _SPEC_KWARG: (backend, alibi)})
    finally:
        instance.config = config


def _base_forward(wrapped, instance, args, kwargs):
    """Packed ALiBi forward: skip the row-wide ALiBi tensor and its (B, H, T, T) mask."""
    if not instance.use_alibi:
        return wrapped(*args, **kwargs)
    call = call_as_kwargs(wrapped, args, kwargs)
    if boundaries_for(call) is None:
        return wrapped(*args, **kwargs)
    instance.use_alibi = False
    try:
        return wrapped(*args, **kwargs)
    finally:
        instance.use_alibi = True


def _refuse(config) -> str | None:
    if getattr(config, "alibi", False) and "flash" in str(config._attn_implementation):
        return (
            "alibi=True with flash attention: upstream's FalconFlashAttention2 raises on ALiBi, so "
            "there is no unpacked behaviour to match; load the model with attn_implementation='sdpa'."
        )
    return None


def _splits_inline(model) -> bool:
    """transformers 5.25+: FalconAttention splits heads inline and calls the AttentionInterface."""
    return not hasattr(type(model.base_model.h[0].self_attention), "_split_heads")


def _patch(model, patcher, options) -> None:
    base = model.base_model
    inline = _splits_inline(model)
    if getattr(base, "use_alibi", False) and model.config._attn_implementation != "sdpa" and not inline:
        logger.warning(
            "hf_varlen_patch: this ALiBi Falcon model runs %r attention, which in transformers adds the "
            "ALiBi bias twice (to the scores and through the mask); packed runs do the same to stay "
            "equal to unpacked runs. Load it with attn_implementation='sdpa' for the single bias.",
            model.config._attn_implementation,
        )
    heads = model.config.num_attention_heads
    if getattr(base, "use_alibi", False) and heads > 8:
        logger.warning(
            "hf_varlen_patch: with %d heads (> 8) upstream Falcon rounds every slope * position ALiBi "
            "product to bf16, which per-sequence slopes cannot reproduce: packed logits differ from "
            "unpacked ones by about 5e-3 in fp32. Not a leak across "
            "sequences; the packed bias is the exact one.",
            heads,
        )
    slopes = _alibi_slopes(model)
    if inline:
        _register_attention_function()
    forward = _packed_interface_forward if inline else _packed_attention_forward
    handler = partial(forward, backend=options.backend, slopes=slopes)
    for layer in base.h:
        wrap_packed_calls(patcher, layer.self_attention, "forward", handler)
    if getattr(base, "use_alibi", False):
        patcher.wrap_method(base, "forward", _base_forward)


register(
    PatchEntry(
        family="falcon",
        model_types=("falcon",),
        test_configs=_configs,
        routes_attention=False,
        patch=_patch,
        refuse=_refuse,
        notes="rotary or per-sequence ALiBi; MQA/GQA, old/new architecture, parallel attention; own "
        "attention wrapped per instance (boundaries by position_ids)",
    )
)
