"""What a packed attention call cannot honour, refused the same way by every patch.

A layer patch calls :func:`refuse_unpackable` on its call's arguments once it knows the call is
packed: attention weights, a head mask and cross-attention have no exact packed form.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .errors import PackedCallError, PackedOutputAttentionsError

__all__ = ["refuse_unpackable", "HEAD_MASKS", "CROSS_ATTENTION"]

#: What transformers calls a per-layer head mask.
HEAD_MASKS = ("head_mask", "layer_head_mask")
#: What attention modules call the states a cross-attention attends to.
CROSS_ATTENTION = ("encoder_hidden_states", "key_value_states")


def refuse_unpackable(call: Mapping[str, Any], *, cross_attention: Iterable[str] = CROSS_ATTENTION) -> None:
    """Raise a typed error, naming the fix, for an argument a packed attention call cannot honour:
    ``output_attentions`` (the varlen kernels build no attention matrix), a head mask (it would
    scale every sequence's heads of the row alike, as upstream does, but upstream gives each
    sequence alone its own row), or states to cross-attend to (``cross_attention`` names them)."""
    if call.get("output_attentions"):
        raise PackedOutputAttentionsError(
            "output_attentions=True is not available with packed inputs (the varlen kernels build no attention "
            "matrix); run the sequences as a padded batch to read attention weights."
        )
    if any(call.get(name) is not None for name in HEAD_MASKS):
        raise PackedCallError("head_mask is not supported with packed inputs; drop it or unpack the batch.")
    if any(call.get(name) is not None for name in cross_attention):
        raise PackedCallError(
            "cross-attention (encoder_hidden_states) cannot be packed: every sequence would attend to the "
            "whole row's encoder states; run it unpacked."
        )
