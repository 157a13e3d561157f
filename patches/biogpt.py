"""BioGPT: scaled word embeddings, learned absolute positions (offset 2) and AttentionInterface
attention.

Upstream takes ``position_ids`` over its own (mask cumsum on 4.57, arange on 5.x) whenever they
are given, and the patched forward always gives the restarting ones, so the generic route is all
it needs on both transformers lines.
"""

from __future__ import annotations

from hf_varlen_patch.registry import PatchEntry, register

from ._common import tiny_config


def _configs(model_type: str) -> dict:
    # 1024 positions: padding positions of the property tests ("continue") reach past 512.
    return {
        "default": tiny_config(
            "biogpt",
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            layerdrop=0.0,
            max_position_embeddings=1024,
        )
    }


register(
    PatchEntry(
        family="biogpt",
        model_types=("biogpt",),
        test_configs=_configs,
        notes="scaled embeddings; learned positions (offset 2) from position_ids; attention via AttentionInterface",
    )
)
