"""Granite-MoE: attention_multiplier as the softmax scale, embedding/residual/logits multipliers, MoE.

Attention goes through the AttentionInterface on both lines (the multipliers live outside it, or
arrive as ``scaling``). On 4.57 the base model does not hand its keyword arguments to the
decoder layers, so the boundaries are re-attached to each attention module from the
``position_ids`` it receives (:func:`pass_boundaries`), and its legacy ``_update_causal_mask``
must leave the packed mask placeholder alone (:func:`keep_packed_mask`).
"""

from __future__ import annotations

from hf_varlen_patch.registry import PatchEntry, register
from hf_varlen_patch.versions import TRANSFORMERS_4

from ._common import tiny_config
from ._legacy_attention import keep_packed_mask, pass_boundaries
from ._rope import refuse_length_dependent_rope


def _configs(model_type: str) -> dict:
    return {
        "multipliers": tiny_config(
            "granitemoe",
            num_local_experts=4,
            num_experts_per_tok=2,
            attention_multiplier=0.9,
            embedding_multiplier=2.0,
            residual_multiplier=0.5,
            logits_scaling=2.0,
        )
    }


def _patch(model, patcher, options) -> None:

    if not TRANSFORMERS_4:
        return
    keep_packed_mask(patcher, model.base_model)
    for layer in model.base_model.layers:
        pass_boundaries(patcher, layer.self_attn)


register(
    PatchEntry(
        family="granitemoe",
        model_types=("granitemoe",),
        test_configs=_configs,
        refuse=refuse_length_dependent_rope,
        patch=_patch,
        notes="attention/embedding/residual/logits multipliers, MoE; 4.57: boundaries re-attached to attention",
    )
)

register(
    PatchEntry(
        family="granitemoe",
        model_types=("granitemoeshared",),
        refuse=refuse_length_dependent_rope,
        patch=_patch,
        notes="attention/embedding/residual/logits multipliers, MoE; 4.57: boundaries re-attached to attention",
    )
)
