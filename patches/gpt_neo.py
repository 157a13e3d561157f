"""GPT-Neo: learned positions from ``position_ids``; alternating global and local (sliding window,
``window_size``) attention layers.

On both transformers lines the attention classes are picked by name at construction and their
``forward`` receives neither ``position_ids`` nor keyword arguments (the 4.57 base model takes no
``**kwargs`` at all), so the boundaries come from ``current_boundaries()`` and, for gradient
checkpoint recomputation, from the mask tensor the blocks get (see :func:`_find`). Each
self-attention module's ``forward``/``_attn`` are wrapped as for GPT-J
(:func:`patches.gptj.patch_attn_method`). The local layers' window is applied inside each
sequence by the backend (a query sees itself and ``window_size - 1`` earlier tokens, as
upstream's banded ``bias`` buffer); GPT-Neo does not scale the scores.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from hf_varlen_patch.boundaries import Boundaries
from hf_varlen_patch.patching import current_boundaries, track_layer
from hf_varlen_patch.registry import PatchEntry, register

from ._common import tiny_config
from .gptj import patch_attn_method


def _configs(model_type: str) -> dict:
    # window 8 is shorter than the 1..64-token test sequences; layer 0 global, layer 1 local.
    return {
        "global_local": tiny_config(
            "gpt_neo",
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            window_size=8,
            embed_dropout=0.0,
            resid_dropout=0.0,
            attention_dropout=0.0,
            bos_token_id=1,
            eos_token_id=2,
        )
    }


#: boundaries by the (B, 1, T, T) mask tensor the blocks received in a packed forward.
_BY_MASK = WeakIdKeyDictionary()


def _find(call: dict) -> Boundaries | None:
    """The boundaries of this attention call: the running packed forward's, or, in a gradient
    checkpoint recomputation, those remembered for the very mask object it passes again.

    transformers 5.x checkpoints the class ``forward`` of each block (bypassing the instance-level
    ``track_layer`` wrapper, so ``current_boundaries()`` is None there); the block's keyword
    arguments, the mask among them, are replayed as the same objects, even with
    ``use_reentrant=True``.
    """
    mask = call.get("attention_mask")
    keyed = isinstance(mask, torch.Tensor)
    boundaries = current_boundaries()
    if boundaries is not None:
        if keyed:
            _BY_MASK[mask] = boundaries
        return boundaries
    return _BY_MASK.get(mask) if keyed else None


def _patch(model, patcher, options) -> None:
    config = model.config
    # Only a flash-attention GPT-Neo on 4.57 can hand its blocks no mask tensor to key on (then
    # track_layer covers recomputation, refusing use_reentrant=True loudly); elsewhere the mask
    # key also serves reentrant checkpointing, which track_layer would refuse.
    track = config._attn_implementation != "eager"
    for block in model.base_model.h:
        if track:
            track_layer(patcher, block)
        outer = block.attn  # GPTNeoAttention: holds the layer's attention_type
        window = config.window_size if outer.attention_type == "local" else None
        patch_attn_method(patcher, outer.attention, backend=options.backend, scale=1.0, window=window, find=_find)


register(
    PatchEntry(
        family="gpt_neo",
        model_types=("gpt_neo",),
        test_configs=_configs,
        generic=False,
        patch=_patch,
        notes="learned positions; global and local (window_size) layers; attention _attn wrapped per instance",
    )
)
