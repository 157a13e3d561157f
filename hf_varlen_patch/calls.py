"""What a forward call carries, read the same way by every wrapper: its batch shape and its cache."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["CACHE_KWARGS", "cache_of", "batch_shape"]

#: The names a KV cache travels under, across transformers releases and model families.
CACHE_KWARGS = ("past_key_values", "cache", "past_key_value")


def cache_of(call: dict) -> Any:
    """The KV cache a call carries, whatever this transformers release names it."""
    for name in CACHE_KWARGS:
        if call.get(name) is not None:
            return call[name]
    return None


def batch_shape(call: dict) -> tuple[int, int] | None:
    """(rows, tokens) of the call's ``input_ids`` or ``inputs_embeds``; None without either."""
    for name in ("input_ids", "inputs_embeds"):
        value = call.get(name)
        if isinstance(value, torch.Tensor) and value.ndim >= 2:
            return int(value.shape[0]), int(value.shape[1])
    return None
