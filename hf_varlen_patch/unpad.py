"""Padded in, packed inside: the real tokens of a padded batch run as one packed row.

With ``apply(model, unpad=True)`` the base model's entry takes a call whose ``attention_mask`` has
padding (right, left or both) and no cache to fill, gathers the real tokens into one row (each
sequence numbered from 0, as if alone; ``nonzero`` once per forward, as flash-attn's
``unpad_input``), runs them through the packed path, and scatters every per-token output back to
the padded layout, padding positions zero. Heads and the caller see the shapes they expect, and no
attention or MLP work is spent on padding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .calls import CACHE_KWARGS, batch_shape, cache_of
from .errors import PackedCallError

__all__ = ["Unpadding", "plan_unpadding", "unpadded_call", "scatter_outputs"]

#: Per-token inputs a model may take besides the token ids (gathered like them); labels of one
#: per token (a causal LM's, a token classifier's) too.
PER_TOKEN = ("input_ids", "inputs_embeds", "labels", "token_type_ids", "mm_token_type_ids", "seq_idx")


@dataclass(frozen=True)
class Unpadding:
    """Where a padded batch's real tokens sit: ``index`` into the flattened ``(B, L)`` layout, and
    the offsets of each non-empty row's run of real tokens in the packed row."""

    index: torch.Tensor
    shape: tuple[int, int]
    cu_seqlens: torch.Tensor
    max_seqlen: int

    @property
    def tokens(self) -> int:
        return int(self.index.numel())


def plan_unpadding(call: Mapping[str, Any], *, padded_only: bool = True) -> Unpadding | None:
    """The unpadding of this call, or None where it runs as it is: no 2-D ``attention_mask``, no
    padding, a cache given (or ``use_cache=True``: generation), or boundaries already given.
    ``padded_only=False`` plans rows without padding too (and drops rows of padding only).

    Each row's real tokens must be one contiguous run (padding on the left, the right, or both);
    a row with holes raises :class:`PackedCallError`.
    """
    mask = call.get("attention_mask")
    shape = batch_shape(call)
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or shape is None or tuple(mask.shape) != shape:
        return None
    if cache_of(call) is not None or call.get("use_cache") is True:
        return None
    if any(call.get(name) is not None for name in ("cu_seq_lens_q", "cu_seq_lens_k")):
        return None
    real = mask != 0
    lengths = real.sum(dim=1)
    # a run starts where a real token follows padding or the row start: one per non-empty row
    starts = real[:, :1].sum(dim=1) + (real[:, 1:] & ~real[:, :-1]).sum(dim=1)
    summary = torch.stack([lengths, starts]).cpu()  # the one host sync of the plan
    lengths_host, starts_host = summary[0].tolist(), summary[1].tolist()
    if not any(lengths_host):
        return None
    if padded_only and (all(n == shape[1] for n in lengths_host) or not all(lengths_host)):
        return None  # no padding: nothing to remove; a row of padding only: upstream's result for it
    holes = [row for row, (n, s) in enumerate(zip(lengths_host, starts_host)) if s > 1 or (n and s != 1)]
    if holes:
        raise PackedCallError(
            f"unpad=True needs each row's real tokens in one run (padding on the left, the right or both); "
            f"attention_mask rows {holes[:8]} have padding between real tokens. Pack such rows with a packing "
            "collator (position_ids restarting per sequence) instead."
        )
    index = real.reshape(-1).nonzero().squeeze(1)
    runs = [n for n in lengths_host if n]
    cu = torch.zeros(len(runs) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(runs, dtype=torch.int32).cumsum(0)
    return Unpadding(index=index, shape=shape, cu_seqlens=cu.to(mask.device), max_seqlen=max(runs, default=0))


def _gather(value: torch.Tensor, plan: Unpadding) -> torch.Tensor:
    batch, length = plan.shape
    return value.reshape(batch * length, *value.shape[2:]).index_select(0, plan.index).unsqueeze(0)


def _positions(call: Mapping[str, Any], plan: Unpadding, mask: torch.Tensor) -> torch.Tensor:
    """Each sequence's own positions from 0 (as alone); given ``position_ids`` are gathered and
    must number each sequence from 0 (left padding numbered from the row start does not)."""
    batch, length = plan.shape
    own = (mask != 0).to(torch.int64).cumsum(dim=1) - 1
    own = own.reshape(-1).index_select(0, plan.index).unsqueeze(0)
    given = call.get("position_ids")
    if not isinstance(given, torch.Tensor):
        return own
    if given.ndim == 3:  # rotary rows (k, B, L): each gathered like the text row
        rows = given.expand(given.shape[0], batch, length).reshape(given.shape[0], batch * length)
        return rows.index_select(1, plan.index).unsqueeze(1)
    text = given.expand(batch, length).reshape(-1).index_select(0, plan.index).unsqueeze(0)
    if not torch.equal(text.to(own.device), own):
        raise PackedCallError(
            "unpad=True runs every padded row as its sequence alone, numbered from 0, but the position_ids given "
            "number some sequence otherwise (left padding counted from the row start?). Drop position_ids, or "
            "pass attention_mask.cumsum(-1) - 1."
        )
    return text


def unpadded_call(call: dict, plan: Unpadding) -> dict:
    """``call`` with its real tokens as one packed row: per-token inputs gathered, positions per
    sequence, the boundaries as the collator's ``cu_seq_lens`` kwargs, no mask and no cache."""
    mask = call["attention_mask"]
    out = dict(call)
    for name in PER_TOKEN:
        value = out.get(name)
        if isinstance(value, torch.Tensor) and tuple(value.shape[:2]) == plan.shape:
            out[name] = _gather(value, plan)
    out["position_ids"] = _positions(call, plan, mask)
    out["attention_mask"] = None
    out["use_cache"] = False
    out.update(
        cu_seq_lens_q=plan.cu_seqlens,
        cu_seq_lens_k=plan.cu_seqlens,
        max_length_q=plan.max_seqlen,
        max_length_k=plan.max_seqlen,
    )
    return out


def _scatter(value: Any, plan: Unpadding) -> Any:
    batch, length = plan.shape
    if isinstance(value, (tuple, list)):
        return type(value)(_scatter(v, plan) for v in value)
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        return value
    if value.ndim >= 2 and value.shape[0] == 1 and value.shape[1] == plan.tokens:  # (1, N, ...)
        flat = value.new_zeros(batch * length, *value.shape[2:]).index_copy(0, plan.index, value[0])
        return flat.reshape(batch, length, *value.shape[2:])
    if value.shape[0] == plan.tokens:  # (N, ...): per-token values flattened (MoE router logits)
        return value.new_zeros(batch * length, *value.shape[1:]).index_copy(0, plan.index, value)
    return value


def scatter_outputs(out: Any, plan: Unpadding, *, pooled: bool = False) -> Any:
    """The model's outputs back in the padded layout (zeros at padding), no cache. ``pooled``:
    the logits are one row per sequence (sequence classification), which is one per padded row."""
    if isinstance(out, tuple):
        return tuple(v if pooled and i < 2 and _is_pooled(v, plan) else _scatter(v, plan) for i, v in enumerate(out))
    fields = {
        k: (None if k in CACHE_KWARGS else v if pooled and k == "logits" else _scatter(v, plan)) for k, v in out.items()
    }
    return type(out)(**fields)


def _is_pooled(value: Any, plan: Unpadding) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim == 2 and value.shape[0] == plan.shape[0]
