"""Decoders of encoder-decoder families used as causal LMs (``BartForCausalLM`` and kin).

Their attention goes through the AttentionInterface, but the learned or sinusoidal position
table is indexed by an ``arange`` over the row (``position_ids`` never reach it), so a packed
row would number its second sequence from where the first ended. The engine's
:func:`~hf_varlen_patch.patching.index_positions_per_sequence` re-indexes that table per
sequence. Cross-attention (``encoder_hidden_states``) cannot be packed and raises. These models
do not shift ``labels`` (``labels[t]`` is the target of ``logits[t]``), so a packed forward masks
each sequence's last label instead of its first.
"""

from __future__ import annotations

from hf_varlen_patch.patching import index_positions_per_sequence
from hf_varlen_patch.registry import PatchEntry, register

from ._common import on_transformers_4


def _patch(model, patcher, options) -> None:
    tables = [m for name, m in model.named_modules() if name.endswith("embed_positions")]
    if not tables:
        raise NotImplementedError(f"{type(model).__name__} has no embed_positions module to re-index")
    for table in tables:
        index_positions_per_sequence(patcher, table)


register(
    PatchEntry(
        family="seq2seq_decoders",
        model_types=(
            "bart",
            "mbart",
            "plbart",
            "pegasus",
            "marian",
            "blenderbot-small",
        ),
        patch=_patch,
        refuse=on_transformers_4("these causal LMs take no position_ids or **kwargs"),
        shifts_labels=False,
        notes="learned/sinusoidal positions re-indexed per sequence; attention via AttentionInterface",
    )
)

register(
    PatchEntry(
        family="seq2seq_decoders",
        model_types=("whisper",),
        refuse=on_transformers_4("WhisperForCausalLM takes no position_ids or **kwargs"),
        shifts_labels=False,
        notes="learned positions indexed by position_ids; attention via AttentionInterface; labels not shifted",
    )
)
