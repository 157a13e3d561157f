"""BERT-style self-attention that computes itself: MegatronBERT and RemBERT on every line, and
on transformers 4.57 (whose BERT models take no ``**kwargs``) BERT, ELECTRA, ERNIE, RoCBERT,
BertGeneration and the RoBERTa family.

Positions come from ``position_ids`` (absolute table); the self-attention module (``query``,
``key``, ``value`` projections, scores / sqrt(head size), dropout on the probabilities) is
wrapped per instance: a packed call projects as upstream does and attends through the varlen
backend, causal when the model is a decoder (``is_decoder``) and bidirectional within each
sequence otherwise. The boundaries come from the call's kwargs, else from the packed forward's
context; :func:`~hf_varlen_patch.patching.track_layer` keeps them for gradient-checkpoint
recomputation. Cross-attention, ``head_mask``, ``output_attentions`` and relative position
embeddings are refused in packed calls.
"""

from __future__ import annotations

import math
import sys

import transformers

from hf_varlen_patch.attention import is_packed_mask_placeholder, varlen_attention
from hf_varlen_patch.backends import AttentionSpec
from hf_varlen_patch.patching import cache_of, call_as_kwargs, track_layer, wrap_packed_calls
from hf_varlen_patch.registry import PatchEntry, register
from hf_varlen_patch.versions import TRANSFORMERS_4


def _self_attention(backend: str):
    def packed(wrapped, instance, call, boundaries):
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

    return packed


def decoder_variants(model_type: str) -> dict:
    """The twin as its default (bidirectional) config and as a decoder (``is_decoder=True``)."""
    from hf_varlen_patch.twins import tiny_config

    return {"twin": tiny_config(model_type), "decoder": tiny_config(model_type, is_decoder=True)}


def _keep_placeholder(wrapped, instance, args, kwargs):
    """4.57's ``get_extended_attention_mask`` rejects a 4-D mask; packed attention ignores it."""
    mask = call_as_kwargs(wrapped, args, kwargs).get("attention_mask")
    if is_packed_mask_placeholder(mask):
        return mask
    return wrapped(*args, **kwargs)


def wrap_self_attention(model, patcher, options) -> None:
    """Wrap every BERT-style self-attention module of ``model`` (packed calls only)."""
    base = model.base_model
    if callable(getattr(base, "get_extended_attention_mask", None)):
        patcher.wrap_method(base, "get_extended_attention_mask", _keep_placeholder)
    found = [m for m in model.modules() if type(m).__name__.endswith("SelfAttention") and hasattr(m, "query")]
    if not found:
        raise NotImplementedError(f"{type(model).__name__} has no BERT-style self-attention to wrap")
    for module in found:
        wrap_packed_calls(patcher, module, "forward", _self_attention(options.backend))
        track_layer(patcher, module)


def refuse_bidirectional_decoder(config) -> str | None:
    """Some 5.x releases (5.17 among them) build MegatronBERT's, RemBERT's and RoFormer's mask with
    ``create_bidirectional_mask`` even when ``is_decoder=True``: their causal LM then sees later
    tokens, and there is no causal per-sequence result to match. Read from the installed code."""
    if TRANSFORMERS_4 or not getattr(config, "is_decoder", False):
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, ""), None)
    module = sys.modules.get(getattr(cls, "__module__", ""), None)
    if module is not None and not hasattr(module, "create_causal_mask"):
        return (
            f"on transformers {transformers.__version__} this model builds a bidirectional mask even with "
            "is_decoder=True (its causal LM attends to later tokens), so a packed causal result has nothing to "
            "match; use transformers 4.57 or 5.24, where it is causal and tested."
        )
    return None


def refuse_relative_positions(config) -> str | None:
    reason = refuse_bidirectional_decoder(config)
    if reason:
        return reason
    kind = getattr(config, "position_embedding_type", "absolute") or "absolute"
    if kind != "absolute":
        return (
            f"position_embedding_type={kind!r} adds position terms inside attention scores, which the packed "
            "kernels do not take; use absolute positions for packed training."
        )
    return None


def _patch(model, patcher, options) -> None:
    wrap_self_attention(model, patcher, options)


register(
    PatchEntry(
        family="bert_legacy",
        model_types=("megatron-bert", "rembert"),
        test_configs=decoder_variants,
        routes_attention=False,
        patch=_patch,
        refuse=refuse_relative_positions,
        notes="absolute positions from position_ids; own self-attention wrapped per instance (causal for decoders)",
    )
)


#: BERT-style decoders on the generic route on 5.x; on 4.57 their self-attention is wrapped.
BERT_LIKE = ("bert", "bert-generation", "electra", "ernie", "roc_bert")


def _bert_like_patch(model, patcher, options) -> None:
    if TRANSFORMERS_4:
        wrap_self_attention(model, patcher, options)


register(
    PatchEntry(
        family="bert_legacy",
        model_types=BERT_LIKE,
        test_configs=decoder_variants,
        routes_attention=not TRANSFORMERS_4,
        patch=_bert_like_patch,
        refuse=refuse_relative_positions,
        notes="absolute positions from position_ids; 5.x: attention via AttentionInterface; 4.57: own "
        "self-attention wrapped per instance (causal for decoders)",
    )
)
