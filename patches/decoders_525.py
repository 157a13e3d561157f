"""Causal LMs new in transformers 5.25: three generic-route decoders and one refusal.

- ``ergo`` (sliding-window and full layers, MoE), ``minicpm5_moe`` and ``param2moe`` (MoE) route
  attention through the AttentionInterface with the kwargs passed down and take their rotary
  positions from ``position_ids``: the generic route is all packing needs (as ``decoders``), tested
  on their tiny twins.
- ``kolibri1_1`` is refused: its indexed-attention layers overlay a per-query key selection (the
  top ``index_topk`` keys of a pool its indexer scores, plus sink and local tokens) on the dense
  4-D mask, which varlen attention does not take. Below the selection budget (2,184 keys by
  default) a query sees every key, so a short twin would pass while long sequences diverge; with
  the budget shrunk under the twin's sequences the generic route is off by 0.42 (fp32, CPU).
"""

from __future__ import annotations

from hf_varlen_patch.registry import PatchEntry, register

from ._rope import refuse_length_dependent_rope

DECODERS = ("ergo", "minicpm5_moe", "param2moe")

NOTES = (
    "new in 5.25: positions from position_ids, attention via AttentionInterface (tested on the tiny twin); "
    "kolibri1_1 refused (indexed attention)"
)

REASONS = {
    "kolibri1_1": "its indexed-attention layers attend to a per-query selection of keys (Kolibri1_1Indexer: the "
    "top index_topk of a scored pool, plus sink and local tokens) laid over the dense 4-D mask, which packed "
    "varlen attention does not take; it needs a dedicated patch",
}

register(
    PatchEntry(
        family="decoders_525",
        model_types=DECODERS,
        refuse=refuse_length_dependent_rope,
        notes=NOTES,
    )
)

# The generic shrink keeps the first layers' types and the 50-layer K/V-sharing map, which the
# shrunk config rejects: a sliding layer, an indexer and an indexed layer reading its K/V, with a
# selection budget the twin's sequences exceed.
TWINS = {
    "kolibri1_1": {
        "num_hidden_layers": 3,
        "layer_types": ["sliding_attention", "indexed_attention", "indexed_attention"],
        "index_layers": [1],
        "kv_source_layers": [0, 1, 1],
        "mlp_only_layers": [0],
        "index_num_heads": 1,
        "index_pool_size": 32,
        "index_compression": 4,
        "index_num_local_tokens": 2,
        "index_num_sink_tokens": 1,
    },
}


register(
    PatchEntry(
        family="decoders_525",
        model_types=tuple(REASONS),
        refuse=lambda config: REASONS[config.model_type],
        twin_overrides=TWINS,
        notes=NOTES,
    )
)
