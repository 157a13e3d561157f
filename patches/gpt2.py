"""GPT-2: learned absolute positions indexed by ``position_ids`` (so they restart per
sequence once the caller passes them) and AttentionInterface attention."""

from __future__ import annotations

from hf_varlen_patch.registry import PatchEntry, register

from ._common import VERIFIED


def _configs(model_type: str) -> dict:
    from transformers import AutoConfig

    return {
        "default": AutoConfig.for_model(
            "gpt2",
            vocab_size=128,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=512,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    }


register(
    PatchEntry(
        family="gpt2",
        model_types=("gpt2",),
        verified=VERIFIED,
        test_configs=_configs,
        notes="learned positions from position_ids; attention via AttentionInterface",
    )
)
