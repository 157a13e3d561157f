"""MVP's decoder as a causal LM (``MvpForCausalLM``): learned positions (offset 2) from an
``arange`` over the row, and BART-style attention that computes itself (``bmm`` scores plus the
layer's mask), outside the AttentionInterface on both transformers lines.

In a packed forward the position table is looked up at each token's position within its own
sequence (padding: position 0), so a packed row may be longer than the table as long as every
sequence fits (:func:`~hf_varlen_patch.patching.index_positions_per_sequence` would look the
whole row up first). Each decoder self-attention projects as upstream does (queries
pre-scaled), updates the cache, and attends through the varlen backend (causal, attention
dropout). Its layers call attention without keyword arguments, so the boundaries come from the
packed forward's context (:func:`~hf_varlen_patch.context.boundaries_for` for gradient
checkpointing). On 4.57 the causal LM takes no ``position_ids``: the patched forward accepts
them anyway (the boundaries travel in the context). MVP does not shift ``labels``.

Refused: ``use_prompt=True`` (prompt keys and values shared by the whole row, which the varlen
kernels cannot prepend per sequence); cross-attention, ``head_mask`` and ``output_attentions``
raise in packed calls.
"""

from __future__ import annotations

from typing import Any

import torch

from hf_varlen_patch.context import boundaries_for
from hf_varlen_patch.patching import Patcher
from hf_varlen_patch.registry import PatchEntry, PatchOptions, register

from ._own_attention import refuse_when_packed, remember_padding, sequence_positions, wrap_bart_style_self_attention


def _refuse(config: Any) -> str | None:
    if getattr(config, "use_prompt", False):
        return (
            "use_prompt=True prepends prompt keys and values that every token of the row attends to; the varlen "
            "kernels cannot prepend them per sequence."
        )
    return None


def _positions_per_sequence(wrapped, instance, args, kwargs):
    boundaries = boundaries_for()
    if boundaries is None:
        return wrapped(*args, **kwargs)
    positions = sequence_positions(boundaries, instance.weight.device)
    return torch.nn.Embedding.forward(instance, positions + instance.offset)  # upstream's lookup, per sequence


def _patch(model: Any, patcher: Patcher, options: PatchOptions) -> None:
    decoder = model.model.decoder
    remember_padding(patcher, decoder)  # the causal LM hands the decoder the caller's mask
    patcher.wrap_method(decoder.embed_positions, "forward", _positions_per_sequence)
    for layer in decoder.layers:
        wrap_bart_style_self_attention(patcher, layer.self_attn, options.backend)
        refuse_when_packed(patcher, layer.encoder_attn, "cross-attention (encoder_hidden_states)")


register(
    PatchEntry(
        family="mvp",
        model_types=("mvp",),
        routes_attention=False,
        patch=_patch,
        refuse=_refuse,
        shifts_labels=False,
        notes="learned positions per sequence (rows may exceed the table); own self-attention wrapped per "
        "instance; labels not shifted; use_prompt refused",
    )
)
