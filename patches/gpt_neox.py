"""GPT-NeoX (Pythia): partial rotary from ``position_ids``, parallel residual, attention via
AttentionInterface."""

from __future__ import annotations

from hf_varlen_patch.registry import PatchEntry, register

from ._common import tiny_config


def _configs(model_type: str) -> dict:
    return {"default": tiny_config("gpt_neox", rotary_pct=0.5, hidden_dropout=0.0)}


register(
    PatchEntry(
        family="gpt_neox",
        model_types=("gpt_neox",),
        test_configs=_configs,
        notes="partial rotary; parallel residual; attention via AttentionInterface",
    )
)
