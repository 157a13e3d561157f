"""Llama-like decoders whose attention goes through transformers' AttentionInterface.

Rotary positions come from ``position_ids``, so the generic route (boundaries to the attention
function) is all they need. Sliding-window variants pass ``sliding_window`` per layer.
"""

from __future__ import annotations

from hf_varlen_patch.registry import PatchEntry, register

from ._common import tiny_config
from ._rope import refuse_length_dependent_rope

WINDOW = 8  # shorter than the test sequences, so the window is exercised


def _configs(model_type: str) -> dict:
    if model_type == "mistral":
        return {"sliding_window": tiny_config("mistral", sliding_window=WINDOW)}
    if model_type == "mixtral":
        return {
            "default": tiny_config("mixtral", num_local_experts=4, num_experts_per_tok=2),
            "sliding_window": tiny_config("mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
        }
    if model_type == "qwen2":
        return {
            "default": tiny_config("qwen2"),
            "sliding_window": tiny_config("qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
        }
    if model_type == "qwen3":
        return {"default": tiny_config("qwen3", head_dim=16)}
    if model_type == "phi3":
        return {"default": tiny_config("phi3", pad_token_id=0, sliding_window=None)}
    if model_type == "starcoder2":
        return {
            "sliding_window": tiny_config(
                "starcoder2", sliding_window=WINDOW, residual_dropout=0.0, embedding_dropout=0.0
            )
        }
    return {"default": tiny_config(model_type)}


register(
    PatchEntry(
        family="llama",
        model_types=("llama", "mistral", "mixtral", "qwen2", "qwen3", "phi3", "starcoder2"),
        test_configs=_configs,
        refuse=refuse_length_dependent_rope,
        notes="rotary; attention via AttentionInterface (sliding window where configured)",
    )
)
