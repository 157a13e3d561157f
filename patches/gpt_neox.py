"""GPT-NeoX (Pythia): partial rotary from ``position_ids``, parallel residual, attention via
AttentionInterface."""

from __future__ import annotations

from hf_varlen_patch.registry import PatchEntry, register

from ._common import VERIFIED


def _configs(model_type: str) -> dict:
    from transformers import AutoConfig

    return {
        "default": AutoConfig.for_model(
            "gpt_neox",
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=512,
            rotary_pct=0.5,
            attention_dropout=0.0,
            hidden_dropout=0.0,
            tie_word_embeddings=False,
        )
    }


register(
    PatchEntry(
        family="gpt_neox",
        model_types=("gpt_neox",),
        verified=VERIFIED,
        test_configs=_configs,
        notes="partial rotary; parallel residual; attention via AttentionInterface",
    )
)
