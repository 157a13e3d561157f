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


def on_transformers_4(model_type_reason: str):
    """A ``refuse`` for entries that need transformers 5.x: on 4.57 the base model takes no
    ``**kwargs`` (or the causal LM no ``position_ids``), so the boundaries cannot reach attention."""

    def refuse(config: Any) -> str | None:
        import transformers

        if transformers.__version__.startswith("4."):
            return (
                f"on transformers 4.57 {model_type_reason}, so the packed boundaries cannot reach its attention; "
                "upgrade to transformers 5.x, where this entry is tested."
            )
        from ._legacy_attention import refuse_length_dependent_rope

        return refuse_length_dependent_rope(config)

    return refuse
