"""PhiMoE (Phi-3.5-MoE): sparsemixer top-2 routing, optional sliding window, LongRoPE.

5.x: attention goes through the AttentionInterface, but the layer applies its sliding window
only through the mask, so packed calls get ``sliding_window`` added (:func:`pass_boundaries`).
4.57: legacy attention classes (``PHIMOE_ATTENTION_CLASSES``) and a base model without
``**kwargs``; in a packed forward each attention module runs :func:`_packed_forward`.

LongRoPE picks short or long frequencies (and mscale) from the length of the input: 5.x from
``max(position_ids) + 1`` of the whole batch, 4.57 from the row length. A sequence alone uses its
own length, so in a packed forward every token gets the regime of its own sequence
(:func:`_long_tokens`): on 5.x by wrapping the model's rotary embedding, on 4.57 inside
:func:`_packed_forward`. With LongRoPE a batch of several rows with ``position_ids`` (and an empty
cache) runs the packed path too, one sequence per row (``rows_are_sequences``): upstream would
give every row the longest row's regime. Such a batch differs from upstream's in the padding's
own logits (padding attends only to padding) and, where rows reach different regimes, in the
shorter rows; real tokens' logits and the loss are upstream's bit for bit where the rows share
a regime (an exception to "unpacked calls run upstream's code unchanged" that
``tests/test_unpacked.py`` states exactly).
"""

from __future__ import annotations

from functools import partial

import torch

from hf_varlen_patch.backends import AttentionSpec
from hf_varlen_patch.boundaries import Boundaries
from hf_varlen_patch.context import boundaries_for
from hf_varlen_patch.patching import call_as_kwargs
from hf_varlen_patch.registry import PatchEntry, register
from hf_varlen_patch.versions import TRANSFORMERS_4

from ._common import tiny_config
from ._legacy_attention import modeling_module, packed_attention, pass_boundaries
from ._rope import refuse_length_dependent_rope

WINDOW = 8


def _configs(model_type: str) -> dict:
    # router_jitter_noise=0 makes sparsemixer's training-mode Gumbel sampling deterministic (only
    # the top expert survives its threshold), so train-mode packed and separate runs route alike.
    common = dict(num_local_experts=4, router_jitter_noise=0.0, eos_token_id=2)
    # LongRoPE with an original context of 32, so test sequences (1..64) use both regimes.
    longrope = {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.1 * i for i in range(8)],
        "long_factor": [2.0 + 0.5 * i for i in range(8)],
        "short_mscale": 1.1,
        "long_mscale": 1.3,
        "original_max_position_embeddings": 32,
    }
    if _rope_key() == "rope_parameters":
        longrope["rope_theta"] = 1e6
    return {
        "default": tiny_config("phimoe", attention_bias=True, lm_head_bias=True, **common),
        "sliding_window": tiny_config("phimoe", sliding_window=WINDOW, **common),
        "longrope": tiny_config("phimoe", **{_rope_key(): longrope}, **common),
    }


def _rope_key() -> str:

    return "rope_scaling" if TRANSFORMERS_4 else "rope_parameters"


def _rope(config) -> dict:
    return getattr(config, _rope_key(), None) or {"rope_type": "default"}


def _long_tokens(position_ids: torch.Tensor, boundaries: Boundaries, limit: int) -> torch.Tensor:
    """(B, T) bool: the token's own sequence reaches past ``limit`` (its max position + 1 > limit)."""
    positions = position_ids.expand(boundaries.shape).reshape(-1)
    seq = boundaries.seq_idx.reshape(-1).long()
    top = torch.full((boundaries.num_sequences,), -1, dtype=positions.dtype, device=positions.device)
    top = top.scatter_reduce(0, seq, positions, "amax")
    return (top[seq] + 1 > limit).view(boundaries.shape)


def _longrope_rotary(wrapped, instance, args, kwargs):
    """5.x: the model's rotary embedding, per sequence in a packed forward."""
    call = call_as_kwargs(wrapped, args, kwargs)
    position_ids = call.get("position_ids")
    boundaries = boundaries_for(call)
    if boundaries is None:
        return wrapped(*args, **kwargs)
    x = call["x"]
    limit = instance.config.rope_parameters["original_max_position_embeddings"]
    long = _long_tokens(position_ids, boundaries, limit)
    if not bool(long.any()):  # one regime, as upstream picks it (upstream syncs on seq_len too)
        return wrapped(*args, **kwargs)
    positions = position_ids.expand(boundaries.shape)
    # every position of a short sequence is < limit: with the long ones zeroed the max is too
    short_cos, short_sin = wrapped(x, positions.masked_fill(long, 0))
    # one extra position = limit puts the whole call in the long regime; drop it afterwards
    extended = torch.cat([positions.reshape(1, -1), positions.new_full((1, 1), limit)], dim=1)
    long_cos, long_sin = (t[:, :-1].reshape(*boundaries.shape, -1) for t in wrapped(x, extended))
    pick = long[..., None]
    return torch.where(pick, long_cos, short_cos), torch.where(pick, long_sin, short_sin)


def _legacy_longrope(self, rotary, call: dict, like: torch.Tensor):
    """4.57: per-token cos/sin (B, T, D) for a packed call, each in its sequence's regime."""
    position_ids = call["position_ids"]
    boundaries = boundaries_for(call)
    limit = self.config.rope_scaling["original_max_position_embeddings"]
    long = _long_tokens(position_ids, boundaries, limit)
    positions = position_ids.expand(boundaries.shape)
    short_cos, short_sin = rotary(like, seq_len=limit)
    long_cos, long_sin = rotary(like, seq_len=max(boundaries.position_bound, limit + 1))
    short_at = positions.masked_fill(long, 0)
    pick = long[..., None]
    cos = torch.where(pick, long_cos[positions], short_cos[short_at])
    sin = torch.where(pick, long_sin[positions], short_sin[short_at])
    return cos, sin


def _legacy(model) -> bool:
    return hasattr(modeling_module(model), "PHIMOE_ATTENTION_CLASSES")


def _window(config) -> dict:
    return {"sliding_window": config.sliding_window} if config.sliding_window is not None else {}


def _packed_forward(self, call: dict, attend, *, rotary, longrope: bool):
    modeling = modeling_module(self)
    hidden = call["hidden_states"]
    batch, length, _ = hidden.shape
    q = self.q_proj(hidden).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
    k = self.k_proj(hidden).view(batch, length, self.num_key_value_heads, self.head_dim).transpose(1, 2)
    v = self.v_proj(hidden).view(batch, length, self.num_key_value_heads, self.head_dim).transpose(1, 2)
    cos, sin = call["position_embeddings"]
    if not longrope:
        bound = boundaries_for(call).position_bound
        if cos.shape[0] < bound:  # upstream's table covers the call's length; a sequence-parallel slice needs more
            cos, sin = rotary(v, seq_len=bound)
        q, k = modeling.apply_rotary_pos_emb(q, k, cos, sin, call["position_ids"])
    else:  # LongRoPE: the same maths with per-token cos/sin
        cos_t, sin_t = (t.unsqueeze(1) for t in _legacy_longrope(self, rotary, call, v))
        q = q * cos_t + modeling.rotate_half(q) * sin_t
        k = k * cos_t + modeling.rotate_half(k) * sin_t
    cache_kwargs = {"sin": sin, "cos": cos, "cache_position": call.get("cache_position")}
    spec = AttentionSpec(
        causal=True,
        window=self.config.sliding_window,
        dropout=self.attention_dropout if self.training else 0.0,
    )
    out = attend(q, k, v, spec, cache_kwargs)
    return self.o_proj(out.reshape(batch, length, self.hidden_size)), None


def _patch(model, patcher, options) -> None:
    legacy = _legacy(model)
    base = model.base_model
    longrope = _rope(model.config).get("rope_type") == "longrope"
    for layer in base.layers:
        if legacy:
            forward = partial(_packed_forward, rotary=base.rotary_emb, longrope=longrope)
            packed_attention(patcher, layer.self_attn, forward, backend=options.backend)
        elif model.config.sliding_window is not None:
            pass_boundaries(patcher, layer.self_attn, extra=lambda module: _window(module.config))
    if longrope and not legacy:
        patcher.wrap_method(base.rotary_emb, "forward", _longrope_rotary)


register(
    PatchEntry(
        family="phimoe",
        model_types=("phimoe",),
        test_configs=_configs,
        routes_attention=lambda model: not _legacy(model),
        patch=_patch,
        refuse=lambda config: refuse_length_dependent_rope(config, allowed=("longrope",)),
        rows_are_sequences=lambda config: _rope(config).get("rope_type") == "longrope",
        notes=(
            "sparsemixer MoE; sliding window passed to attention; LongRoPE regime per sequence, and per row in "
            "padded batches with position_ids (run as one sequence per row: the padding's own logits differ from "
            "upstream's); 4.57: legacy attention classes wrapped per instance"
        ),
    )
)
