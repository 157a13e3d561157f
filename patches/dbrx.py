"""DBRX: fused Wqkv with ``clip_qkv``, GQA, top-k MoE; configured through nested
``attn_config`` / ``ffn_config``.

5.x: a plain AttentionInterface model (generic route).
4.57: legacy attention classes (``DBRX_ATTENTION_CLASSES``) with their own rotary embedding and a
base model whose ``**kwargs`` go nowhere; in a packed forward each attention module runs
:func:`_packed_forward` (cache indexed by ``block_idx``); the packed mask placeholder the base
model gets bypasses its legacy ``_update_causal_mask`` (:func:`keep_packed_mask`).
"""

from __future__ import annotations

from hf_varlen_patch.backends import AttentionSpec
from hf_varlen_patch.registry import PatchEntry, register

from ._legacy_attention import keep_packed_mask, modeling_module, packed_attention
from ._rope import refuse_length_dependent_rope


def _configs(model_type: str) -> dict:
    from transformers import AutoConfig

    # rope_theta in attn_config: 4.57 reads it there, 5.x's attention still reads it at
    # construction (its rotary uses the top-level rope parameters). clip_qkv=0.2 clips about a
    # fifth of the fused q/k/v entries.
    return {
        "clip_qkv": AutoConfig.for_model(
            "dbrx",
            d_model=64,
            n_heads=4,
            n_layers=2,
            vocab_size=128,
            max_seq_len=512,
            attn_config={"kv_n_heads": 2, "clip_qkv": 0.2, "rope_theta": 10000.0},
            ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
        )
    }


def _legacy(model) -> bool:
    return hasattr(modeling_module(model), "DBRX_ATTENTION_CLASSES")


def _packed_forward(self, call: dict, attend):
    hidden = call["hidden_states"]
    batch, length, _ = hidden.shape
    kv_size = self.num_key_value_heads * self.head_dim
    qkv = self.Wqkv(hidden)
    if self.clip_qkv is not None:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = qkv.split([self.hidden_size, kv_size, kv_size], dim=2)
    q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
    k = k.view(batch, length, self.num_key_value_heads, self.head_dim).transpose(1, 2)
    v = v.view(batch, length, self.num_key_value_heads, self.head_dim).transpose(1, 2)
    cos, sin = self.rotary_emb(v, call["position_ids"])
    q, k = modeling_module(self).apply_rotary_pos_emb(q, k, cos, sin)
    cache_kwargs = {"sin": sin, "cos": cos, "cache_position": call.get("cache_position")}
    spec = AttentionSpec(causal=True, dropout=self.attn_pdrop if self.training else 0.0)
    out = attend(q, k, v, spec, cache_kwargs)
    return self.out_proj(out.reshape(batch, length, self.hidden_size)), None


def _patch(model, patcher, options) -> None:
    if not _legacy(model):
        return
    keep_packed_mask(patcher, model.base_model)
    for block in model.base_model.blocks:
        attention = block.norm_attn_norm.attn
        packed_attention(patcher, attention, _packed_forward, backend=options.backend, layer_idx="block_idx")


register(
    PatchEntry(
        family="dbrx",
        model_types=("dbrx",),
        test_configs=_configs,
        refuse=refuse_length_dependent_rope,
        routes_attention=lambda model: not _legacy(model),
        patch=_patch,
        notes="fused Wqkv with clip_qkv, MoE; 4.57: legacy attention classes wrapped per instance",
    )
)
