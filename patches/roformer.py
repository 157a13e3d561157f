"""RoFormer: rotary positions from a frozen sinusoidal table looked up with an ``arange`` over
the row (the encoder computes it once, as ``sinusoidal_pos``), and a BERT-style self-attention
that computes itself, outside the AttentionInterface on both transformers lines.

In a packed forward each self-attention module rotates its queries and keys (and values with
``rotary_value``) with the table rows of every token's position within its own sequence
(padding: position 0), through the module's own ``apply_rotary_position_embeddings``, and
attends through the varlen backend: causal for a decoder (``is_decoder``), bidirectional within
each sequence otherwise (as upstream's ``RoFormerForCausalLM`` without ``is_decoder``), scores /
sqrt(head size), attention dropout. The encoder's row-wide lookup is then made at position 0 (it
is unused), so a packed row may be longer than the table as long as every sequence fits. The
layers call attention without the boundaries: they come from the packed forward's context
(:func:`~hf_varlen_patch.context.boundaries_for` for gradient checkpointing). Cross-attention,
``head_mask`` and ``output_attentions`` raise in packed calls.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch

from hf_varlen_patch.attention import varlen_attention
from hf_varlen_patch.backends import AttentionSpec
from hf_varlen_patch.context import boundaries_for
from hf_varlen_patch.patching import Patcher, cache_of, call_as_kwargs, wrap_packed_calls
from hf_varlen_patch.registry import PatchEntry, PatchOptions, register

from ._own_attention import layer_call_boundaries, refuse_when_packed, remember_padding, sequence_positions
from .bert_legacy import refuse_bidirectional_decoder


def _configs(model_type: str) -> dict:
    from hf_varlen_patch.twins import tiny_config

    return {
        "twin": tiny_config(model_type),
        "decoder": tiny_config(model_type, is_decoder=True),
        "decoder_rotary_value": tiny_config(model_type, is_decoder=True, rotary_value=True),
    }


def _refuse(config: Any) -> str | None:
    reason = refuse_bidirectional_decoder(config)
    if reason:
        return reason
    if getattr(config, "add_cross_attention", False):
        return "add_cross_attention=True: cross-attention over packed sequences is not supported."
    return None


def _row_lookup_at_zero(wrapped, instance, args, kwargs):
    """The encoder's ``sinusoidal_pos`` of a packed forward: unused, so looked up at position 0."""
    if boundaries_for() is None:
        return wrapped(*args, **kwargs)
    call = call_as_kwargs(wrapped, args, kwargs)
    length = call["input_ids_shape"][1]
    call["position_ids"] = torch.zeros(length, dtype=torch.long, device=instance.weight.device)
    return wrapped(**call)


def _self_attention(wrapped, instance, call, boundaries, *, backend: str, table: torch.nn.Embedding):
    hidden = call["hidden_states"]
    batch, length, _ = hidden.shape
    shape = (batch, length, -1, instance.attention_head_size)
    q, k, v = (proj(hidden).view(shape).transpose(1, 2) for proj in (instance.query, instance.key, instance.value))
    positions = sequence_positions(boundaries, table.weight.device)
    sinusoidal = torch.nn.functional.embedding(positions, table.weight)[:, None]  # (B, 1, T, head size)
    if instance.rotary_value:
        q, k, v = instance.apply_rotary_position_embeddings(sinusoidal, q, k, v)
    else:
        q, k = instance.apply_rotary_position_embeddings(sinusoidal, q, k)
    cache = cache_of(call)
    if cache is not None:
        cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache
        k, v = cache.update(k, v, instance.layer_idx)
    spec = AttentionSpec(
        causal=bool(instance.is_decoder),
        scale=1.0 / math.sqrt(instance.attention_head_size),
        dropout=instance.dropout.p if instance.training else 0.0,
    )
    out = varlen_attention(backend, q, k, v, boundaries, spec)
    return out.reshape(batch, length, instance.all_head_size), None


def _patch(model: Any, patcher: Patcher, options: PatchOptions) -> None:
    encoder = model.base_model.encoder
    table = encoder.embed_positions
    remember_padding(patcher, model)  # the caller's mask: the base model gets none in packed forwards
    patcher.wrap_method(table, "forward", _row_lookup_at_zero)
    for layer in encoder.layer:
        attention = layer.attention.self
        handler = partial(_self_attention, backend=options.backend, table=table)
        wrap_packed_calls(patcher, attention, "forward", handler, find=layer_call_boundaries)
        if hasattr(layer, "crossattention"):
            refuse_when_packed(patcher, layer.crossattention, "cross-attention (encoder_hidden_states)")


register(
    PatchEntry(
        family="roformer",
        model_types=("roformer",),
        test_configs=_configs,
        routes_attention=False,
        patch=_patch,
        refuse=_refuse,
        notes="sinusoidal rotary per sequence position; own self-attention wrapped per instance (causal for "
        "decoders, bidirectional within each sequence otherwise)",
    )
)
