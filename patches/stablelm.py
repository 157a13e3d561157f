"""StableLM: partial rotary, optional per-head q/k LayerNorm, optional parallel residual.

5.x: attention goes through the AttentionInterface, but the decoder layer calls it without the
keyword arguments, so the boundaries are added back on each attention module from the
``position_ids`` it receives (:func:`pass_boundaries`).
4.57: legacy attention classes (``ATTENTION_CLASSES``) and a base model without ``**kwargs``;
in a packed forward each attention module runs :func:`_packed_forward` (the upstream maths
through the varlen backend).
"""

from __future__ import annotations

import torch

from hf_varlen_patch.backends import AttentionSpec
from hf_varlen_patch.registry import PatchEntry, register

from ._common import tiny_config
from ._legacy_attention import modeling_module, packed_attention, pass_boundaries
from ._rope import refuse_length_dependent_rope


def _configs(model_type: str) -> dict:
    # No qk_layernorm variant: 4.57 cannot build such a model from a config (its _init_weights
    # zeroes the bias of the bias-free per-head LayerNorms), and the variants (so the README
    # table) must be the same on both lines. The 4.57 packed forward applies them as upstream.
    return {
        "default": tiny_config("stablelm"),
        "parallel_qkv_bias": tiny_config(
            "stablelm", use_parallel_residual=True, use_qkv_bias=True, partial_rotary_factor=0.5
        ),
    }


def _legacy(model) -> bool:
    return hasattr(modeling_module(model), "ATTENTION_CLASSES")


def _packed_forward(self, call: dict, attend):
    hidden = call["hidden_states"]
    batch, length, _ = hidden.shape
    q = self.q_proj(hidden).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
    k = self.k_proj(hidden).view(batch, length, self.num_key_value_heads, self.head_dim).transpose(1, 2)
    v = self.v_proj(hidden).view(batch, length, self.num_key_value_heads, self.head_dim).transpose(1, 2)
    if self.qk_layernorm:
        q, k = self.q_layernorm(q), self.k_layernorm(k)
    cos, sin = call["position_embeddings"]
    rot = self.rotary_ndims
    q_rot, k_rot = modeling_module(self).apply_rotary_pos_emb(q[..., :rot], k[..., :rot], cos, sin)
    q = torch.cat((q_rot, q[..., rot:]), dim=-1)
    k = torch.cat((k_rot, k[..., rot:]), dim=-1)
    cache_kwargs = {"sin": sin, "cos": cos, "partial_rotation_size": rot, "cache_position": call.get("cache_position")}
    spec = AttentionSpec(causal=True, dropout=self.attention_dropout.p if self.training else 0.0)
    out = attend(q, k, v, spec, cache_kwargs)
    return self.o_proj(out.reshape(batch, length, self.hidden_size)), None


def _patch(model, patcher, options) -> None:
    legacy = _legacy(model)
    for layer in model.base_model.layers:
        if legacy:
            packed_attention(patcher, layer.self_attn, _packed_forward, backend=options.backend)
        else:
            pass_boundaries(patcher, layer.self_attn)


register(
    PatchEntry(
        family="stablelm",
        model_types=("stablelm",),
        test_configs=_configs,
        refuse=refuse_length_dependent_rope,
        routes_attention=lambda model: not _legacy(model),
        patch=_patch,
        notes=(
            "partial rotary, per-head q/k LayerNorm; 5.x: boundaries re-attached to attention from position_ids; "
            "4.57: legacy attention classes wrapped per instance"
        ),
    )
)
