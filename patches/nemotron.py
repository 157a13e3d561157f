"""Nemotron: partial rotary, layer-norm1p.

On 5.x the decoder layer calls its attention without the keyword arguments, so the boundaries
are re-attached to each attention module from the ``position_ids`` it receives
(:func:`~patches._legacy_attention.pass_boundaries`). On 4.57 the attention classes are picked by
name at construction (``NEMOTRON_ATTENTION_CLASSES``) and compute attention themselves, and the
base model takes no ``**kwargs``: each attention module is wrapped on this instance
(:func:`~patches._legacy_attention.packed_attention`, Llama-style projections and rotary), finding
the boundaries by the ``position_ids`` its layer passes.
"""

from __future__ import annotations

from hf_varlen_patch.registry import PatchEntry, register

from ._legacy_attention import (
    llama_style_forward,
    modeling_module,
    packed_attention,
    pass_boundaries,
)
from ._rope import refuse_length_dependent_rope


def _legacy(model) -> bool:
    return hasattr(modeling_module(model), "NEMOTRON_ATTENTION_CLASSES")


def _patch(model, patcher, options) -> None:
    for layer in model.base_model.layers:
        if _legacy(model):
            packed_attention(patcher, layer.self_attn, llama_style_forward, backend=options.backend)
        else:
            pass_boundaries(patcher, layer.self_attn)


register(
    PatchEntry(
        family="nemotron",
        model_types=("nemotron",),
        routes_attention=lambda model: not _legacy(model),
        patch=_patch,
        refuse=refuse_length_dependent_rope,
        notes="partial rotary; boundaries re-attached to attention (its layer drops the kwargs); "
        "4.57: legacy attention classes wrapped per instance",
    )
)
