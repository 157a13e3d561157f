"""BLOOM: ALiBi, per sequence.

BLOOM has no position_ids and its attention is not an AttentionInterface function; the base model
builds one ALiBi tensor (``slope * key_position``) and one causal mask for the whole row, and on
4.57 its forwards reject unknown keyword arguments. So, on this instance:
  - the head model's ``forward`` drops the ``varlen_boundaries``/``position_ids`` keywords;
  - the base model's ``forward`` gets the zero-memory placeholder mask in a packed forward (both
    versions pass a 4-D mask through), and its ``build_alibi_tensor`` returns for it a
    zero-memory dummy tied to the boundaries; the base model hands that tensor to every block as
    a keyword argument, so gradient-checkpoint recomputation sees the same object;
  - every attention module's ``forward``, given such a dummy, runs the upstream projections and
    the varlen backend with ``alibi_slopes`` (upstream adds ``beta * alibi`` to the scores scaled
    by ``inv_norm_factor``; beta is 1), attention dropout in train mode, the output projection
    (``pretraining_tp``/``slow_but_exact`` included) and ``dropout_add``.
The slopes are read off upstream's own ``build_alibi_tensor`` (fp32). ``slope * key_position``
equals ``-slope * (i - j)`` up to a per-query constant, which softmax cancels, because BLOOM's
attention is causal (every key j <= i).
"""

from __future__ import annotations

import sys
from functools import partial

import torch
import torch.nn.functional as F

from hf_varlen_patch.attention import is_packed_mask_placeholder, varlen_attention
from hf_varlen_patch.backends import AttentionSpec
from hf_varlen_patch.context import boundaries_for, remember
from hf_varlen_patch.patching import call_as_kwargs, wrap_packed_calls
from hf_varlen_patch.registry import PatchEntry, register

from ._alibi import (
    SlopeCache,
    drop_packed_kwargs_wrapper,
    packed_mask_wrapper,
    recall_by,
    update_cache,
)


def _configs(model_type: str) -> dict:
    from transformers import AutoConfig

    # Six heads: four power-of-two slopes plus two from BLOOM's extra base, so both branches of
    # the slope formula are exercised; biases reach ~30 on 64-token sequences. initializer_range
    # 0.1 makes attention (and so a wrong slope) matter: a 0.1% slope error moves logits ~5e-4.
    return {
        "default": AutoConfig.for_model(
            "bloom",
            vocab_size=128,
            hidden_size=48,
            n_layer=2,
            n_head=6,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            initializer_range=0.1,
            tie_word_embeddings=False,
        )
    }


def _alibi_slopes(base) -> SlopeCache:
    build = base.build_alibi_tensor  # upstream's, taken before it is wrapped
    num_heads = base.num_heads

    def compute(device):
        ones = torch.ones((1, 2), dtype=torch.long, device=device)
        return build(ones, num_heads, torch.float32)[:, 0, 1]  # (heads, 1, 2): slope * [0, 1]

    return SlopeCache(compute)


def _build_alibi_tensor(wrapped, instance, args, kwargs):
    """For the placeholder mask of a packed forward: a zero-memory dummy, tied to the boundaries."""
    call = call_as_kwargs(wrapped, args, kwargs)
    mask = call["attention_mask"]
    boundaries = boundaries_for()
    if boundaries is None or not is_packed_mask_placeholder(mask):
        return wrapped(*args, **kwargs)
    batch, length = mask.shape[0], mask.shape[-1]
    dummy = torch.zeros((), dtype=call["dtype"], device=mask.device).expand(batch * call["num_heads"], 1, length)
    return remember(dummy, boundaries)


def _packed_attention_forward(wrapped, instance, call, boundaries, *, backend: str, slopes: SlopeCache):
    hidden = call["hidden_states"]
    modeling = sys.modules[type(instance).__module__]
    batch, length, _ = hidden.shape
    query, key, value = instance._reshape(instance.query_key_value(hidden))
    key, value = update_cache(call.get("layer_past"), key, value, instance.layer_idx, call)
    spec = AttentionSpec(
        causal=True,
        scale=instance.inv_norm_factor,
        alibi_slopes=slopes(query.device) * instance.beta,
        dropout=instance.attention_dropout.p if instance.training else 0.0,
    )
    context = varlen_attention(backend, query, key, value, boundaries, spec).reshape(batch, length, -1)
    if instance.pretraining_tp > 1 and instance.slow_but_exact:
        slices = instance.hidden_size / instance.pretraining_tp
        output = torch.zeros_like(context)
        for i in range(instance.pretraining_tp):
            output = output + F.linear(
                context[:, :, int(i * slices) : int((i + 1) * slices)],
                instance.dense.weight[:, int(i * slices) : int((i + 1) * slices)],
            )
    else:
        output = instance.dense(context)
    output = modeling.dropout_add(output, call["residual"], instance.hidden_dropout, instance.training)
    return output, None


def _patch(model, patcher, options) -> None:
    base = model.base_model
    slopes = _alibi_slopes(base)
    for block in base.h:
        handler = partial(_packed_attention_forward, backend=options.backend, slopes=slopes)
        wrap_packed_calls(patcher, block.self_attention, "forward", handler, find=recall_by("alibi"))
    patcher.wrap_method(base, "build_alibi_tensor", _build_alibi_tensor)
    patcher.wrap_method(base, "forward", packed_mask_wrapper(placeholder=True))  # 4-D masks pass through
    if model is not base:
        patcher.wrap_method(model, "forward", drop_packed_kwargs_wrapper)


register(
    PatchEntry(
        family="bloom",
        model_types=("bloom",),
        test_configs=_configs,
        routes_attention=False,
        patch=_patch,
        notes="per-sequence ALiBi; own attention wrapped per instance (boundaries tied to the ALiBi tensor)",
    )
)
