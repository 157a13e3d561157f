"""MPT: ALiBi, per sequence, and ``attn_config.clip_qkv``.

MPT has no position_ids and its attention is not an AttentionInterface function; the base model
builds one ALiBi tensor (``slope * (key_position - (max_seq_len - 1))``, sliced to the keys) and
one causal mask for the whole row. On this instance:
  - the base model's ``forward`` gets, in a packed forward, the zero-memory placeholder mask
    (5.x: ``create_causal_mask`` passes it through) or no mask (4.57:
    ``_prepare_4d_causal_attention_mask`` inverts any mask, so it builds its causal mask);
  - its ``build_mpt_alibi_tensor`` result is tied to the boundaries in a packed forward; the base
    model hands it to every block as a keyword argument, so gradient-checkpoint recomputation
    sees the same object;
  - every attention module's ``forward``, given such a tensor, runs the upstream projection (with
    the ``clip_qkv`` clamp) and the varlen backend with ``alibi_slopes`` (upstream adds the bias
    to the scores scaled by ``softmax_scale``) and attention dropout in train mode.
The slopes are read off upstream's own ``build_mpt_alibi_tensor``, called as upstream calls it
(transformers' MPT always applies ALiBi with the default ``alibi_bias_max=8``, whatever
``attn_config.alibi``/``alibi_bias_max`` say, and so does this patch). The bias is
``-slope * (i - j)`` plus a per-query constant because MPT's attention is causal (keys j <= i).
A packed sequence longer than ``max_seq_len`` raises: upstream cannot run it alone either.
"""

from __future__ import annotations

import sys
from functools import partial

from hf_varlen_patch.attention import varlen_attention
from hf_varlen_patch.backends import AttentionSpec
from hf_varlen_patch.context import boundaries_for, remember
from hf_varlen_patch.errors import VarlenPatchError
from hf_varlen_patch.patching import cache_of, wrap_packed_calls
from hf_varlen_patch.registry import PatchEntry, register

from ._alibi import SlopeCache, packed_mask_wrapper, recall_by, update_cache


def _config(**attn_config):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "mpt",
        vocab_size=128,
        d_model=48,
        n_heads=6,
        n_layers=2,
        expansion_ratio=2,
        max_seq_len=1024,
        attn_config=dict(attn_config),  # attn_pdrop defaults to 0
        tie_word_embeddings=False,
    )


def _configs(model_type: str) -> dict:
    # Six heads: MPT interleaves the slopes of the next power of two (8), so the reordering is
    # exercised. clip_qkv=0.1 clips a large share of the tiny model's q/k/v entries (std ~0.16).
    return {"default": _config(), "clip_qkv": _config(clip_qkv=0.1)}


def _alibi_slopes(base) -> SlopeCache:
    build = base.build_mpt_alibi_tensor  # upstream's, as MptModel.forward calls it
    num_heads = base.num_heads

    def compute(device):
        return -build(num_heads, 2, device=device)[:, 0, 0]  # (heads, 1, 2): slope * [-1, 0]

    return SlopeCache(compute)


def _build_alibi_tensor(wrapped, instance, args, kwargs):
    """Upstream's row-wide ALiBi tensor; in a packed forward, tied to the boundaries."""
    alibi = wrapped(*args, **kwargs)
    boundaries = boundaries_for()
    return alibi if boundaries is None else remember(alibi, boundaries)


def _packed_attention_forward(wrapped, instance, call, boundaries, *, backend: str, slopes: SlopeCache):
    hidden = call["hidden_states"]
    if boundaries.max_seqlen > instance.max_seq_length:
        raise VarlenPatchError(
            f"a packed sequence (or padding run) has {boundaries.max_seqlen} tokens, more than MPT's "
            f"max_seq_len={instance.max_seq_length} that its ALiBi covers."
        )
    batch, length, _ = hidden.shape
    mixed = instance.Wqkv(hidden)
    if instance.clip_qkv:
        mixed = mixed.clamp(min=-instance.clip_qkv, max=instance.clip_qkv)
    query, key, value = (
        t.reshape(batch, length, instance.n_heads, instance.head_dim).transpose(1, 2) for t in mixed.chunk(3, dim=2)
    )
    key, value = update_cache(cache_of(call), key, value, instance.layer_idx, call)
    spec = AttentionSpec(
        causal=True,
        scale=instance.softmax_scale,
        alibi_slopes=slopes(query.device),
        dropout=instance.attn_dropout_p if instance.training else 0.0,
    )
    out = varlen_attention(backend, query, key, value, boundaries, spec)
    return instance.out_proj(out.reshape(batch, length, -1)), None


def _patch(model, patcher, options) -> None:
    base = model.base_model
    slopes = _alibi_slopes(base)
    for block in base.blocks:
        handler = partial(_packed_attention_forward, backend=options.backend, slopes=slopes)
        wrap_packed_calls(patcher, block.attn, "forward", handler, find=recall_by("position_bias"))
    # 5.x builds its mask with create_causal_mask, which passes a 4-D mask through; 4.57's
    # _prepare_4d_causal_attention_mask inverts any mask it gets (1.0 - mask), so there the base
    # model gets no mask and builds its (B, 1, T, T) causal mask, which the attention ignores.
    modeling = sys.modules[type(base).__module__]
    placeholder = hasattr(modeling, "create_causal_mask")
    patcher.wrap_method(base, "build_mpt_alibi_tensor", _build_alibi_tensor)
    patcher.wrap_method(base, "forward", packed_mask_wrapper(placeholder=placeholder))


register(
    PatchEntry(
        family="mpt",
        model_types=("mpt",),
        test_configs=_configs,
        routes_attention=False,
        patch=_patch,
        notes="per-sequence ALiBi; clip_qkv; own attention wrapped per instance (boundaries tied to the ALiBi tensor)",
    )
)
