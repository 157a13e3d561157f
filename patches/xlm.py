"""XLM (``XLMWithLMHeadModel``): learned (or sinusoidal) positions from ``position_ids``, language
and token-type embeddings per token, and a multi-head attention that computes itself, outside
the AttentionInterface on both transformers lines; causal (CLM checkpoints) or bidirectional
(MLM checkpoints, the config default).

Without an ``attention_mask`` upstream takes a row's length to be its count of non-``pad_index``
tokens and masks the tokens past it (their hidden states are zeroed after every layer, and
bidirectional attention hides them as keys). In a packed forward the base model gets that mask
per sequence instead (a sequence's count of non-pad tokens, as it would alone; padding between
or after sequences masked too), and every attention module projects as upstream (queries
pre-scaled by 1 / sqrt(head_dim)) and attends through the varlen backend: causal, or
bidirectional within each sequence with its masked tail split off as a segment of its own (what
hiding those keys amounts to; the tail's outputs are zeroed anyway). The boundaries come from
the packed forward's context. XLM's loss does not shift ``labels``.

Raised in packed calls: ``lengths`` (one length per row), cross-attention, ``head_mask``,
``output_attentions``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from hf_varlen_patch.attention import varlen_attention
from hf_varlen_patch.backends import AttentionSpec
from hf_varlen_patch.boundaries import Boundaries
from hf_varlen_patch.context import BOUNDARIES_KWARG, boundaries_for
from hf_varlen_patch.errors import VarlenPatchError
from hf_varlen_patch.patching import Patcher, cache_of, call_as_kwargs, wrap_packed_calls
from hf_varlen_patch.registry import PatchEntry, PatchOptions, register

from ._own_attention import current_padding, remember_padding

_MASK = "xlm_token_mask"
_SPLIT = "xlm_split_at_masked_tails"


def _configs(model_type: str) -> dict:
    from hf_varlen_patch.twins import tiny_config

    # 1024 positions: padding positions of the property tests ("continue") reach past 512.
    return {
        "twin": tiny_config(model_type, max_position_embeddings=1024),
        "causal": tiny_config(model_type, causal=True, max_position_embeddings=1024),
    }


def _token_mask(model: torch.nn.Module, call: dict, boundaries: Boundaries) -> torch.Tensor:
    """(B, T) upstream's mask of every sequence as it would be alone (no attention_mask), and 0 on
    the row's padding; memoised in the boundaries for the attention modules."""
    if _MASK not in boundaries.cache:
        seq = boundaries.seq_idx.to(torch.int64)
        valid = torch.ones(boundaries.total_tokens, dtype=torch.bool, device=boundaries.device)
        ids = call.get("input_ids")
        if ids is not None:
            real = (ids.reshape(-1) != model.pad_index).to(torch.int64).to(boundaries.device)
            counts = torch.zeros(boundaries.num_sequences, dtype=torch.int64, device=boundaries.device)
            counts.scatter_add_(0, seq, real)
            valid = boundaries.position_ids().reshape(-1) < counts[seq]
        padding = current_padding()
        if padding is not None and padding.numel() == valid.numel():
            valid &= padding.reshape(-1).to(valid.device) != 0
        boundaries.cache[_MASK] = valid.view(boundaries.shape)
    return boundaries.cache[_MASK]


def _split_at_masked_tails(boundaries: Boundaries) -> Boundaries:
    """The boundaries with every run of masked tokens a segment of its own (bidirectional XLM
    hides them as keys); memoised, one device-to-host copy."""
    if _SPLIT not in boundaries.cache:
        valid = boundaries.cache[_MASK].reshape(-1).cpu()
        seq = boundaries.seq_idx.to(torch.int64).cpu()
        starts = torch.ones_like(valid)
        starts[1:] = (seq[1:] != seq[:-1]) | (valid[1:] != valid[:-1])
        if int(starts.sum()) == boundaries.num_sequences:
            boundaries.cache[_SPLIT] = boundaries
        else:
            flat = starts.nonzero().flatten()
            cu = torch.cat([flat, torch.tensor([valid.numel()])]).to(torch.int32)
            boundaries.cache[_SPLIT] = Boundaries(
                cu_seqlens=cu.to(boundaries.device),
                max_seqlen=int((cu[1:] - cu[:-1]).max()),
                seq_idx=(starts.cumsum(0) - 1).to(torch.int32).to(boundaries.device),
                shape=boundaries.shape,
                is_packed=True,
            )
    return boundaries.cache[_SPLIT]


def _packed_base(wrapped, instance, args, kwargs):
    boundaries = boundaries_for()
    if boundaries is None:
        return wrapped(*args, **kwargs)
    call = call_as_kwargs(wrapped, args, kwargs)
    if call.get("lengths") is not None:
        raise VarlenPatchError("lengths (one per row) cannot describe packed rows; pass position_ids instead.")
    call["attention_mask"] = _token_mask(instance, call, boundaries).to(torch.int64)
    call.pop(BOUNDARIES_KWARG, None)
    return wrapped(**call)


def _input_boundaries(instance: torch.nn.Module, call: dict) -> Boundaries | None:
    return boundaries_for(key=call["input"], layer=instance)


def _attention(wrapped, instance, call, boundaries, *, backend: str, causal: bool):
    hidden = call["input"]
    if not causal:
        boundaries = _split_at_masked_tails(boundaries)
    batch, length, _ = hidden.shape
    shape = (batch, length, instance.n_heads, instance.head_dim)
    q = instance.q_lin(hidden).view(shape).transpose(1, 2) / instance.head_dim**0.5
    k = instance.k_lin(hidden).view(shape).transpose(1, 2)
    v = instance.v_lin(hidden).view(shape).transpose(1, 2)
    cache = cache_of(call)
    if cache is not None:
        cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache
        k, v = cache.update(k, v, instance.layer_id)
    spec = AttentionSpec(causal=causal, scale=1.0, dropout=float(instance.dropout) if instance.training else 0.0)
    out = varlen_attention(backend, q, k, v, boundaries, spec)
    return (instance.out_lin(out.reshape(batch, length, -1)),)


def _patch(model: Any, patcher: Patcher, options: PatchOptions) -> None:
    base = model.base_model
    remember_padding(patcher, model)  # the caller's mask: the base model gets the placeholder
    patcher.wrap_method(base, "forward", _packed_base)
    for attention in base.attentions:
        handler = partial(_attention, backend=options.backend, causal=bool(base.causal))
        wrap_packed_calls(patcher, attention, "forward", handler, find=_input_boundaries, cross_attention=("kv",))


register(
    PatchEntry(
        family="xlm",
        model_types=("xlm",),
        test_configs=_configs,
        routes_attention=False,
        patch=_patch,
        shifts_labels=False,
        notes="positions from position_ids; per-sequence length mask; own attention wrapped per instance "
        "(causal, or bidirectional within each sequence); labels not shifted",
    )
)
