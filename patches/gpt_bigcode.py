"""GPTBigCode (StarCoder 1, SantaCoder): learned positions from ``position_ids``, multi-query
(one key/value head) or multi-head attention through the AttentionInterface.

``position_ids`` never reach the attention modules (upstream's flash path cannot see the
boundaries), but on both transformers lines the base model passes its ``**kwargs`` through every
block to the attention function, so the generic route carries the boundaries.
"""

from __future__ import annotations

from hf_varlen_patch.registry import PatchEntry, register

from ._common import tiny_config

_NO_DROPOUT = dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, n_inner=96, bos_token_id=1, eos_token_id=2)


def _configs(model_type: str) -> dict:
    return {
        "multi_query": tiny_config("gpt_bigcode", multi_query=True, **_NO_DROPOUT),
        "multi_head_eager": tiny_config("gpt_bigcode", multi_query=False, attn_implementation="eager", **_NO_DROPOUT),
    }


def _refuse(config) -> str | None:
    if getattr(config, "add_cross_attention", False):
        return (
            "add_cross_attention=True: the cross-attention layers would get the decoder's packing "
            "boundaries for the encoder's keys; packed decoders with cross-attention are not supported."
        )
    return None


register(
    PatchEntry(
        family="gpt_bigcode",
        model_types=("gpt_bigcode",),
        test_configs=_configs,
        refuse=_refuse,
        notes="learned positions; multi-query or multi-head attention via AttentionInterface",
    )
)
