"""Helpers shared by the family modules: hand-written tiny configs."""

from __future__ import annotations

from typing import Any

#: Small enough for CPU property tests, large enough that heads, GQA and windows matter.
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    attention_dropout=0.0,
    tie_word_embeddings=False,
)


def tiny_config(model_type: str, **overrides: Any):
    """A tiny random-init config of ``model_type`` (keyword names as the config spells them)."""
    from transformers import AutoConfig

    kwargs = dict(TINY)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)
