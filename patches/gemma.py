"""Gemma 1/2/3 text decoders: AttentionInterface attention with softcap (Gemma 2) and
alternating sliding-window layers (Gemma 2 and 3)."""

from __future__ import annotations

from hf_varlen_patch.registry import PatchEntry, register

from ._common import VERIFIED, tiny_config


def _configs(model_type: str) -> dict:
    if model_type == "gemma":
        return {"default": tiny_config("gemma", head_dim=16)}
    if model_type == "gemma2":
        # a softcap of 2.0 actually bends the tiny model's logits, so softcap is exercised.
        return {
            "softcap_sliding": tiny_config(
                "gemma2", head_dim=16, sliding_window=8, attn_logit_softcapping=2.0,
                final_logit_softcapping=5.0, query_pre_attn_scalar=16,
            )
        }
    return {
        "sliding": tiny_config(
            "gemma3_text", head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
            num_hidden_layers=3, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        )
    }


register(
    PatchEntry(
        family="gemma",
        model_types=("gemma", "gemma2", "gemma3_text"),
        verified=VERIFIED,
        test_configs=_configs,
        notes="rotary; softcap (gemma2) and sliding-window layers (gemma2, gemma3)",
    )
)
