"""GPT-Neo: learned positions from ``position_ids``; alternating global and local (sliding window,
``window_size``) attention layers.

On both transformers lines the attention classes are picked by name at construction and their
``forward`` receives neither ``position_ids`` nor keyword arguments (the 4.57 base model takes no
``**kwargs`` at all), so the boundaries come from ``boundaries_for()`` (which the engine
keeps valid in gradient-checkpoint recomputation) or the mask tensor the blocks get (see :func:`_find`). Each
self-attention module's ``forward``/``_attn`` are wrapped as for GPT-J
(:func:`patches.gptj.patch_attn_method`). The local layers' window is applied inside each
sequence by the backend (a query sees itself and ``window_size - 1`` earlier tokens, as
upstream's banded ``bias`` buffer); GPT-Neo does not scale the scores.
"""

from __future__ import annotations

from hf_varlen_patch.boundaries import Boundaries
from hf_varlen_patch.context import boundaries_for
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


def _find(call: dict) -> Boundaries | None:
    """The boundaries of this attention call: the running packed forward's (the engine carries them
    into gradient-checkpoint recomputation), else those tied to the very mask object the blocks'
    replayed keyword arguments pass again (a checkpoint wrapper outside transformers')."""
    return boundaries_for(key=call.get("attention_mask"))


def _patch(model, patcher, options) -> None:
    config = model.config
    for block in model.base_model.h:
        outer = block.attn  # GPTNeoAttention: holds the layer's attention_type
        window = config.window_size if outer.attention_type == "local" else None
        patch_attn_method(patcher, outer.attention, backend=options.backend, scale=1.0, window=window, find=_find)


register(
    PatchEntry(
        family="gpt_neo",
        model_types=("gpt_neo",),
        test_configs=_configs,
        routes_attention=False,
        patch=_patch,
        notes="learned positions; global and local (window_size) layers; attention _attn wrapped per instance",
    )
)
