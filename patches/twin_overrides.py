"""Tiny-twin overrides for model_types without an entry of their own, where the default config
would give a twin that misses what the real models have (see ``hf_varlen_patch.twins``)."""

from __future__ import annotations

from hf_varlen_patch.twins import register_twin_overrides

# The default LFM2 config is attention-only; released LFM2 models interleave short-convolution
# layers, which the twin must keep (they leak across packed sequences: the hybrid issue).
register_twin_overrides(
    ("lfm2",), {"layer_types": ["conv", "full_attention"], "full_attn_idxs": [1], "num_hidden_layers": 2}
)
