"""TrOCR's decoder as a causal LM: learned (or sinusoidal) positions from an ``arange`` over the
row, and self-attention that computes itself.

In a packed forward the position table is re-indexed per sequence
(:func:`~hf_varlen_patch.patching.index_positions_per_sequence`) and each self-attention module
projects as upstream does and attends through the varlen backend
(:func:`~patches._own_attention.wrap_bart_style_self_attention`). The decoder layer calls its
attention without keyword arguments: the boundaries come from the packed forward's context, and
in checkpoint recomputation from the hidden states the layer hands its attention again (5.x),
or through the tracked decoder layers (4.57, whose causal LM takes no ``position_ids``; the
patched forward accepts them anyway). TrOCR does not shift ``labels`` inside its loss.
"""

from __future__ import annotations

from hf_varlen_patch.patching import (
    index_positions_per_sequence,
    track_layer,
)
from hf_varlen_patch.registry import PatchEntry, register

from ._own_attention import wrap_bart_style_self_attention


def _patch(model, patcher, options) -> None:
    for name, module in model.named_modules():
        if name.endswith("embed_positions"):
            index_positions_per_sequence(patcher, module)
        elif name.endswith("self_attn"):
            wrap_bart_style_self_attention(patcher, module, options.backend)
        elif hasattr(module, "self_attn"):
            track_layer(patcher, module)


register(
    PatchEntry(
        family="trocr",
        model_types=("trocr",),
        routes_attention=False,
        patch=_patch,
        shifts_labels=False,
        notes="positions re-indexed per sequence; own self-attention wrapped per instance; labels not shifted",
    )
)
