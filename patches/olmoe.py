"""OLMoE: q/k RMSNorm over the full projection, optional ``clip_qkv``, top-k MoE.

5.x: a plain AttentionInterface model (generic route).
4.57: legacy attention classes (``OLMOE_ATTENTION_CLASSES``) and a base model without
``**kwargs``; in a packed forward each attention module runs :func:`_packed_forward`.
"""

from __future__ import annotations

from hf_varlen_patch.backends import AttentionSpec
from hf_varlen_patch.registry import PatchEntry, register

from ._common import tiny_config
from ._legacy_attention import modeling_module, packed_attention
from ._rope import refuse_length_dependent_rope


def _configs(model_type: str) -> dict:
    # clip_qkv=1.0 clips about a third of the (normalised) query and key entries.
    return {"clip_qkv": tiny_config("olmoe", num_experts=4, num_experts_per_tok=2, clip_qkv=1.0, eos_token_id=2)}


def _legacy(model) -> bool:
    return hasattr(modeling_module(model), "OLMOE_ATTENTION_CLASSES")


def _packed_forward(self, call: dict, attend):
    hidden = call["hidden_states"]
    batch, length, _ = hidden.shape
    q = self.q_norm(self.q_proj(hidden))
    k = self.k_norm(self.k_proj(hidden))
    v = self.v_proj(hidden)
    clip = self.config.clip_qkv
    if clip is not None:
        q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
    q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
    k = k.view(batch, length, self.num_key_value_heads, self.head_dim).transpose(1, 2)
    v = v.view(batch, length, self.num_key_value_heads, self.head_dim).transpose(1, 2)
    cos, sin = call["position_embeddings"]
    q, k = modeling_module(self).apply_rotary_pos_emb(q, k, cos, sin)
    cache_kwargs = {"sin": sin, "cos": cos, "cache_position": call.get("cache_position")}
    spec = AttentionSpec(causal=True, dropout=self.attention_dropout if self.training else 0.0)
    out = attend(q, k, v, spec, cache_kwargs)
    return self.o_proj(out.reshape(batch, length, self.hidden_size)), None


def _patch(model, patcher, options) -> None:
    if not _legacy(model):
        return
    for layer in model.base_model.layers:
        packed_attention(patcher, layer.self_attn, _packed_forward, backend=options.backend)


register(
    PatchEntry(
        family="olmoe",
        model_types=("olmoe",),
        test_configs=_configs,
        refuse=refuse_length_dependent_rope,
        routes_attention=lambda model: not _legacy(model),
        patch=_patch,
        notes="q/k norm, clip_qkv, MoE; 4.57: legacy attention classes wrapped per instance",
    )
)
