"""Decoders of encoder-decoder families used as causal LMs (``BartForCausalLM`` and kin).

Their attention goes through the AttentionInterface, but the learned or sinusoidal position
table is indexed by an ``arange`` over the row (``position_ids`` never reach it), so a packed
row would number its second sequence from where the first ended. The engine's
:func:`~hf_varlen_patch.patching.index_positions_per_sequence` re-indexes that table per
sequence. Cross-attention (``encoder_hidden_states``) cannot be packed and raises. These models
do not shift ``labels`` (``labels[t]`` is the target of ``logits[t]``), so a packed forward masks
each sequence's last label instead of its first.

On transformers 4.57 these causal LMs take neither ``position_ids`` nor ``**kwargs``: the patched
forward still accepts them (and the collator's ``cu_seq_lens_*``), and the boundaries reach each
self-attention module from the packed forward's context
(:func:`~hf_varlen_patch.patching.attach_boundaries`); the decoder layers are tracked so that
gradient-checkpoint recomputation sees them too. Whisper's decoder then numbers its tokens with
an ``arange`` as well, so its table is re-indexed the same way.
"""

from __future__ import annotations

from hf_varlen_patch.patching import accepts_argument, attach_boundaries, index_positions_per_sequence, track_layer
from hf_varlen_patch.registry import PatchEntry, register

from ._rope import refuse_length_dependent_rope


def takes_no_positions(model) -> bool:
    """The causal LM's forward takes no ``position_ids`` (transformers 4.57)."""
    return not accepts_argument(type(model).forward, "position_ids")


def _reindex_positions(model, patcher) -> None:
    tables = [m for name, m in model.named_modules() if name.endswith("embed_positions")]
    if not tables:
        raise NotImplementedError(f"{type(model).__name__} has no embed_positions module to re-index")
    for table in tables:
        index_positions_per_sequence(patcher, table)


def _attach_to_self_attention(model, patcher) -> None:
    """Context route: self-attention reads the boundaries; its layer is tracked for checkpointing."""
    layers = [m for name, m in model.named_modules() if name.endswith("self_attn")]
    if not layers:
        raise NotImplementedError(f"{type(model).__name__} has no self_attn modules")
    for name, module in model.named_modules():
        if hasattr(module, "self_attn") and not name.endswith("self_attn"):
            track_layer(patcher, module)
    for attn in layers:
        attach_boundaries(patcher, attn)


def _patch(model, patcher, options) -> None:
    _reindex_positions(model, patcher)
    if takes_no_positions(model):
        _attach_to_self_attention(model, patcher)


def _patch_whisper(model, patcher, options) -> None:
    if takes_no_positions(model):  # 4.57: the decoder numbers its tokens with an arange
        _reindex_positions(model, patcher)
        _attach_to_self_attention(model, patcher)


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
        boundaries_from_context=takes_no_positions,
        refuse=refuse_length_dependent_rope,
        shifts_labels=False,
        notes="learned/sinusoidal positions re-indexed per sequence; attention via AttentionInterface; "
        "4.57: boundaries from the forward's context",
    )
)

register(
    PatchEntry(
        family="seq2seq_decoders",
        model_types=("whisper",),
        patch=_patch_whisper,
        boundaries_from_context=takes_no_positions,
        shifts_labels=False,
        notes="learned positions indexed by position_ids (4.57: re-indexed per sequence, boundaries from the "
        "context); attention via AttentionInterface; labels not shifted",
    )
)
