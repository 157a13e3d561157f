"""Qwen2-MoE.

On 5.x it is a plain AttentionInterface model. On 4.57 its attention classes are picked by name
at construction (``QWEN2MOE_ATTENTION_CLASSES``) and no keyword arguments travel down, so the
attention modules' ``forward`` is wrapped on this instance (``_legacy_attention.packed_attention``):
in a packed forward it projects, applies rotary and calls the varlen backend with the boundaries
found by ``position_ids``; otherwise it runs the original class's forward.
"""

from __future__ import annotations

from hf_varlen_patch.registry import PatchEntry, register
from hf_varlen_patch.versions import TRANSFORMERS_4

from ._common import tiny_config
from ._legacy_attention import llama_style_forward, modeling_module, packed_attention


def _configs(model_type: str) -> dict:
    return {
        "default": tiny_config(
            "qwen2_moe",
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            decoder_sparse_step=1,
        )
    }


def _legacy(model) -> bool:
    return hasattr(modeling_module(model), "QWEN2MOE_ATTENTION_CLASSES")


def _refuse(config) -> str | None:

    if TRANSFORMERS_4 and getattr(config, "use_sliding_window", False):
        return (
            "use_sliding_window=True on transformers 4.57 (its legacy attention classes apply the "
            "window through the mask only); upgrade to transformers 5.x for sliding-window Qwen2-MoE."
        )
    return None


def _patch(model, patcher, options) -> None:
    if not _legacy(model):
        return
    for layer in model.base_model.layers:
        packed_attention(patcher, layer.self_attn, llama_style_forward, backend=options.backend)


register(
    PatchEntry(
        family="qwen2_moe",
        model_types=("qwen2_moe",),
        test_configs=_configs,
        routes_attention=lambda model: not _legacy(model),
        patch=_patch,
        refuse=_refuse,
        notes="MoE with shared expert; 4.57: legacy attention classes wrapped per instance",
    )
)
