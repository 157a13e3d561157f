"""GPT-OSS: attention sinks (``s_aux``), alternating sliding-window / full layers, MoE.

Attention goes through transformers' AttentionInterface on both lines, and the layer passes
``sliding_window`` and ``s_aux`` (the sinks) to it, so the generic route carries everything.
"""

from __future__ import annotations

from hf_varlen_patch.registry import PatchEntry, register

from ._common import tiny_config
from ._rope import refuse_length_dependent_rope


def _configs(model_type: str) -> dict:
    # The sinks are drawn N(0, 0.02) per head; with the tiny model's small attention logits that
    # is far from trivial (swapping two heads' sinks moves the logits by ~0.1, dropping them by
    # ~0.2). The window (8) is shorter than the test sequences; three layers alternate.
    return {
        "sinks_sliding": tiny_config(
            "gpt_oss",
            head_dim=16,
            num_hidden_layers=3,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            sliding_window=8,
            num_local_experts=4,
            num_experts_per_tok=2,
            intermediate_size=32,
        )
    }


register(
    PatchEntry(
        family="gpt_oss",
        model_types=("gpt_oss",),
        test_configs=_configs,
        refuse=refuse_length_dependent_rope,
        notes="rotary; attention sinks and alternating sliding-window layers via AttentionInterface; MoE",
    )
)
