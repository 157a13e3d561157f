"""Gemma 1/2/3 text decoders: AttentionInterface attention with softcap (Gemma 2) and
alternating sliding-window layers (Gemma 2 and 3)."""

from __future__ import annotations

import logging

import torch
import transformers

from hf_varlen_patch.attention import parse_implementation
from hf_varlen_patch.registry import PatchEntry, register

from ._common import tiny_config
from ._rope import refuse_length_dependent_rope

logger = logging.getLogger("hf_varlen_patch")


def _configs(model_type: str) -> dict:
    if model_type == "gemma":
        return {"default": tiny_config("gemma", head_dim=16)}
    if model_type == "gemma2":
        # Larger weights (initializer_range 0.1) and a softcap of 1.0 make the cap change the
        # tiny model's logits by ~0.5, so the softcap really is exercised. Eager is upstream's
        # only softcap-correct implementation on both versions.
        return {
            "softcap_sliding": tiny_config(
                "gemma2",
                head_dim=16,
                sliding_window=8,
                attn_logit_softcapping=1.0,
                final_logit_softcapping=5.0,
                query_pre_attn_scalar=16,
                initializer_range=0.1,
                attn_implementation="eager",
            )
        }
    return {
        "sliding": tiny_config(
            "gemma3_text",
            head_dim=16,
            sliding_window=8,
            query_pre_attn_scalar=16,
            num_hidden_layers=3,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        )
    }


def _warn_sdpa_softcap(model, patcher, options) -> None:
    """transformers' sdpa path (4.57, 5.17; 5.24 refuses it instead) silently drops
    attn_logit_softcapping in unpacked runs."""
    config = model.config
    parsed = parse_implementation(config._attn_implementation)
    if parsed and parsed[1] == "sdpa" and getattr(config, "attn_logit_softcapping", None):
        logger.warning(
            "hf_varlen_patch: this %s model runs sdpa, which (transformers %s) ignores "
            "attn_logit_softcapping in unpacked runs; packed runs apply it. Load the model with "
            "attn_implementation='eager' to get the same maths in both.",
            config.model_type,
            transformers.__version__,
        )


register(
    PatchEntry(
        family="gemma",
        model_types=("gemma", "gemma2", "gemma3_text"),
        test_configs=_configs,
        patch=_warn_sdpa_softcap,
        notes="rotary; softcap (gemma2) and sliding-window layers (gemma2, gemma3)",
    )
)


register(
    PatchEntry(
        family="gemma",
        model_types=("gemma4_text",),
        refuse=refuse_length_dependent_rope,
        # The twin's gradients reach 4.4 (scaled per-layer-input embeddings), where fp32 summation
        # order alone moves them by 4e-5; in float64 packed and separate agree to 1e-7.
        test_dtype=torch.float64,
        notes="rotary; softcap (gemma2) and sliding-window layers (gemma2, gemma3, gemma4); gemma4 tested in float64",
    )
)
