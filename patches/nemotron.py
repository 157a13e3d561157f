"""Nemotron: partial rotary, layer-norm1p; the decoder layer calls its attention without the
keyword arguments, so the boundaries are re-attached to each attention module from the
``position_ids`` it receives (:func:`~patches._legacy_attention.pass_boundaries`)."""

from __future__ import annotations

from hf_varlen_patch.registry import PatchEntry, register

from ._common import on_transformers_4
from ._legacy_attention import pass_boundaries


def _patch(model, patcher, options) -> None:
    for module in model.modules():
        attn = getattr(module, "self_attn", None)
        if attn is not None:
            pass_boundaries(patcher, attn)


register(
    PatchEntry(
        family="nemotron",
        model_types=("nemotron",),
        patch=_patch,
        refuse=on_transformers_4("Nemotron's base model takes no **kwargs"),
        notes="partial rotary; boundaries re-attached to attention (its layer drops the kwargs)",
    )
)
