"""BigBird with full attention (``attention_type="original_full"``): BERT-style self-attention
computed in its own class, absolute positions from ``position_ids``.

Each full self-attention module is wrapped on this instance (as for MegatronBERT,
:func:`~patches.bert_legacy.wrap_self_attention`): a packed call attends through the varlen
backend, causal for decoders. Block-sparse attention is refused: it groups the whole row into
blocks with random and global blocks across it, and upstream switches between the two modes by
the row's length, which packing changes.
"""

from __future__ import annotations

from typing import Any

from hf_varlen_patch.registry import PatchEntry, register

from .bert_legacy import refuse_relative_positions, wrap_self_attention


def _variants(model_type: str) -> dict:
    from hf_varlen_patch.twins import tiny_config

    return {
        "full": tiny_config(model_type, attention_type="original_full"),
        "full_decoder": tiny_config(model_type, attention_type="original_full", is_decoder=True),
        "block_sparse": tiny_config(model_type),
    }


def _refuse(config: Any) -> str | None:
    if getattr(config, "attention_type", "original_full") != "original_full":
        return (
            "attention_type='block_sparse' groups the whole row into blocks (with random and global blocks across "
            "it) and upstream switches modes by the row's length; use attention_type='original_full' for packing."
        )
    return refuse_relative_positions(config)


def _patch(model, patcher, options) -> None:
    wrap_self_attention(model, patcher, options)


register(
    PatchEntry(
        family="big_bird",
        model_types=("big_bird",),
        test_configs=_variants,
        routes_attention=False,
        patch=_patch,
        refuse=_refuse,
        refuse_heads={
            "question_answering": "BigBirdForQuestionAnswering masks its logits by the question length of each row "
            "(the first separator token of the row), so a packed row's later sequences would be scored against the "
            "first one's question"
        },
        notes="original_full attention: own self-attention wrapped per instance (causal for decoders); "
        "block_sparse refused",
    )
)
