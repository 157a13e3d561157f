"""Persimmon: partial rotary, per-head q/k LayerNorm, fused query_key_value, relu^2 MLP.

Attention goes through the AttentionInterface and the keyword arguments reach it on both lines
(generic route). On 4.57 the base model still builds its mask with the legacy
``_update_causal_mask``, which must not process the packed mask placeholder
(:func:`keep_packed_mask`).
"""

from __future__ import annotations

from hf_varlen_patch.registry import PatchEntry, register

from ._common import tiny_config
from ._legacy_attention import keep_packed_mask
from ._rope import refuse_length_dependent_rope


def _configs(model_type: str) -> dict:
    # Persimmon has no GQA: as many key/value heads as query heads.
    return {"default": tiny_config("persimmon", num_key_value_heads=4, qk_layernorm=True, partial_rotary_factor=0.5)}


def _patch(model, patcher, options) -> None:
    keep_packed_mask(patcher, model.base_model)


register(
    PatchEntry(
        family="persimmon",
        model_types=("persimmon",),
        test_configs=_configs,
        refuse=refuse_length_dependent_rope,
        patch=_patch,
        notes="partial rotary, q/k LayerNorm, fused qkv; attention via AttentionInterface",
    )
)
