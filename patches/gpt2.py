"""GPT-2: learned absolute positions indexed by ``position_ids`` (so they restart per
sequence once the caller passes them) and AttentionInterface attention."""

from __future__ import annotations

from hf_varlen_patch.registry import PatchEntry, register

from ._common import tiny_config


def _configs(model_type: str) -> dict:
    return {"default": tiny_config("gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)}


register(
    PatchEntry(
        family="gpt2",
        model_types=("gpt2",),
        test_configs=_configs,
        notes="learned positions from position_ids; attention via AttentionInterface",
    )
)
