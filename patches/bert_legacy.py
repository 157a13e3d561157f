"""BERT-style decoders whose self-attention still computes itself on 5.x (MegatronBERT, RemBERT).

Positions come from ``position_ids`` (absolute table); the self-attention module (``query``,
``key``, ``value`` projections, scores / sqrt(head size), dropout on the probabilities) is
wrapped per instance: a packed call projects as upstream does and attends through the varlen
backend, causal when the model is a decoder (``is_decoder``) and bidirectional within each
sequence otherwise. Cross-attention and ``output_attentions`` are refused in packed calls.
"""

from __future__ import annotations

import math

from hf_varlen_patch.attention import BOUNDARIES_KWARG, varlen_attention
from hf_varlen_patch.backends import AttentionSpec
from hf_varlen_patch.errors import VarlenPatchError
from hf_varlen_patch.patching import cache_of, call_as_kwargs, current_boundaries
from hf_varlen_patch.registry import PatchEntry, register

from ._common import on_transformers_4
from ._legacy_attention import PackedOutputAttentionsError


def _self_attention(backend: str):
    def wrapper(wrapped, instance, args, kwargs):
        call = call_as_kwargs(wrapped, args, kwargs)
        boundaries = call.get(BOUNDARIES_KWARG) or current_boundaries()
        if boundaries is None:
            return wrapped(*args, **kwargs)
        if call.get("encoder_hidden_states") is not None:
            raise VarlenPatchError("cross-attention (encoder_hidden_states) cannot be packed.")
        if call.get("output_attentions"):
            raise PackedOutputAttentionsError("output_attentions=True is not available with packed inputs.")
        hidden = call["hidden_states"]
        shape = (*hidden.shape[:-1], -1, instance.attention_head_size)
        q, k, v = (proj(hidden).view(shape).transpose(1, 2) for proj in (instance.query, instance.key, instance.value))
        cache = cache_of(call)
        if cache is not None:
            cache = getattr(cache, "self_attention_cache", cache)
            k, v = cache.update(k, v, instance.layer_idx)
        spec = AttentionSpec(
            causal=bool(instance.is_decoder),
            scale=1.0 / math.sqrt(instance.attention_head_size),
            dropout=instance.dropout.p if instance.training else 0.0,
        )
        out = varlen_attention(backend, q, k, v, boundaries, spec)
        return out.reshape(*hidden.shape[:-1], -1), None

    return wrapper


def decoder_variants(model_type: str) -> dict:
    """The twin as its default (bidirectional) config and as a decoder (``is_decoder=True``)."""
    from hf_varlen_patch.twins import tiny_config

    return {"twin": tiny_config(model_type), "decoder": tiny_config(model_type, is_decoder=True)}


def _patch(model, patcher, options) -> None:
    found = [m for m in model.modules() if type(m).__name__.endswith("SelfAttention") and hasattr(m, "query")]
    if not found:
        raise NotImplementedError(f"{type(model).__name__} has no BERT-style self-attention to wrap")
    for module in found:
        patcher.wrap_method(module, "forward", _self_attention(options.backend))


register(
    PatchEntry(
        family="bert_legacy",
        model_types=("megatron-bert", "rembert"),
        test_configs=decoder_variants,
        generic=False,
        patch=_patch,
        refuse=on_transformers_4("these models take no **kwargs"),
        notes="absolute positions from position_ids; own self-attention wrapped per instance (causal for decoders)",
    )
)
