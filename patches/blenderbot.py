"""Blenderbot's decoder as a causal LM (``BlenderbotForCausalLM``): learned positions from an
``arange`` over the row (a table of only 128 in every released checkpoint), attention via the
AttentionInterface.

- Positions: in a packed forward the position module is called with each token's position
  within its own sequence (its ``position_ids`` argument), so a packed row may be longer than
  the table as long as every sequence fits (as each must alone); padding tokens get position 0.
  :func:`~hf_varlen_patch.patching.index_positions_per_sequence` would look the whole row up
  first and fail beyond 128 tokens.
- Attention: 5.x passes the keyword arguments down to attention (generic route); on 4.57 the
  causal LM takes no ``position_ids`` or ``**kwargs`` (the patched forward accepts them anyway),
  so each self-attention module reads the boundaries from the packed forward's context
  (:func:`~hf_varlen_patch.patching.attach_boundaries`, layers tracked for checkpointing).
- Cross-attention raises in packed forwards. Labels are not shifted inside the loss.

Upstream's own cache path raises ``IndexError`` whenever ``decoder_layers > encoder_layers``
(the default config and every released checkpoint: 2 encoder layers, 12 or 24 decoder layers),
packed or not, on both transformers lines: ``DynamicCache(config=...)`` makes
``num_hidden_layers`` (= ``encoder_layers``) layers. Train with ``use_cache=False`` there; the
test variant has as many encoder as decoder layers so that the default cache runs too.
"""

from __future__ import annotations

from typing import Any

from hf_varlen_patch.context import boundaries_for
from hf_varlen_patch.patching import Patcher, accepts_argument, attach_boundaries, call_as_kwargs, track_layer
from hf_varlen_patch.registry import PatchEntry, PatchOptions, register

from ._own_attention import refuse_when_packed, remember_padding, sequence_positions


def _configs(model_type: str) -> dict:
    from hf_varlen_patch.twins import tiny_config

    # as many encoder as decoder layers (num_hidden_layers, what the cache is sized by, included)
    return {"twin": tiny_config(model_type, encoder_layers=3, decoder_layers=3, num_hidden_layers=3)}


def _positions_per_sequence(wrapped, instance, args, kwargs):
    boundaries = boundaries_for()
    if boundaries is None:
        return wrapped(*args, **kwargs)
    call = call_as_kwargs(wrapped, args, kwargs)
    call["position_ids"] = sequence_positions(boundaries, instance.weight.device)
    return wrapped(**call)


def _patch(model: Any, patcher: Patcher, options: PatchOptions) -> None:
    decoder = model.model.decoder
    remember_padding(patcher, decoder)  # the causal LM hands the decoder the caller's mask
    patcher.wrap_method(decoder.embed_positions, "forward", _positions_per_sequence)
    from_context = not accepts_argument(type(model).forward, "position_ids")  # 4.57
    for layer in decoder.layers:
        refuse_when_packed(patcher, layer.encoder_attn, "cross-attention (encoder_hidden_states)")
        if from_context:
            attach_boundaries(patcher, layer.self_attn)
            track_layer(patcher, layer)


register(
    PatchEntry(
        family="blenderbot",
        model_types=("blenderbot",),
        test_configs=_configs,
        patch=_patch,
        shifts_labels=False,
        notes="learned positions per sequence (rows may exceed the 128-entry table); attention via "
        "AttentionInterface; 4.57: boundaries from the forward's context; labels not shifted",
    )
)
