"""JetMoE: mixture-of-attention experts (MoA: per-token expert query/output projections) and MoE MLP.

5.x: attention goes through the AttentionInterface with the key/value heads already tiled per
expert slot (generic route).
4.57: legacy attention classes (``JETMOE_ATTENTION_CLASSES``), a base model without ``**kwargs``
and a rotary embedding inside each attention module; in a packed forward each attention module
runs :func:`_packed_forward`. Upstream tiles the key/value heads (``repeat``, head ``slot * Hk +
kv``) where the varlen backends group them (head ``kv * top_k + slot``), so the query heads are
reordered around the kernel instead of copying keys and values.
"""

from __future__ import annotations

import torch

from hf_varlen_patch.attention import is_packed_mask_placeholder
from hf_varlen_patch.backends import AttentionSpec
from hf_varlen_patch.patching import call_as_kwargs
from hf_varlen_patch.registry import PatchEntry, register

from ._common import tiny_config
from ._legacy_attention import modeling_module, packed_attention
from ._rope import refuse_length_dependent_rope


def _configs(model_type: str) -> dict:
    # 2 key/value heads x top-2 attention experts = 4 query heads of 16.
    return {"default": tiny_config("jetmoe", kv_channels=16, num_local_experts=4, num_experts_per_tok=2)}


def _legacy(model) -> bool:
    return hasattr(modeling_module(model), "JETMOE_ATTENTION_CLASSES")


def _packed_forward(self, call: dict, attend):
    hidden = call["hidden_states"]
    batch, length, _ = hidden.shape
    top_k, kv_heads, dim = self.top_k, self.num_key_value_heads, self.head_dim
    q, router_logits, topo_info = self.experts.map(hidden)
    k, v = self.kv_proj(hidden).chunk(2, dim=-1)
    q = q.view(batch, length, self.num_heads, dim).transpose(1, 2)
    k = k.view(batch, length, kv_heads, dim).transpose(1, 2)
    v = v.view(batch, length, kv_heads, dim).transpose(1, 2)
    cos, sin = self.rotary_emb(v, call.get("position_ids"))
    q, k = modeling_module(self).apply_rotary_pos_emb(q, k, cos, sin)
    # (B, top_k * Hk, T, D), head slot * Hk + kv  ->  (B, Hk * top_k, T, D), head kv * top_k + slot
    q = q.view(batch, top_k, kv_heads, length, dim).transpose(1, 2).reshape(batch, kv_heads * top_k, length, dim)
    cache_kwargs = {"sin": sin, "cos": cos, "cache_position": call.get("cache_position")}
    spec = AttentionSpec(causal=True, dropout=self.attention_dropout if self.training else 0.0)
    out = attend(q, k, v, spec, cache_kwargs)  # (B, T, Hk * top_k, D)
    out = out.view(batch, length, kv_heads, top_k, dim).transpose(2, 3).reshape(batch, length, top_k, kv_heads * dim)
    out = self.experts.reduce(out, topo_info)
    return out.view(batch, length, -1), None, router_logits


def _drop_mask_placeholder(wrapped, instance, args, kwargs):
    """4.57's JetMoeForCausalLM declares base_model_prefix "transformer" but keeps its decoder in
    ``.model``, so the engine sees no separate base model and hands the causal LM itself the packed
    mask placeholder. The packed attention ignores masks; give the decoder (and the router aux
    loss) no mask rather than the placeholder, as for base models without ``**kwargs``."""
    call = call_as_kwargs(wrapped, args, kwargs)
    if not is_packed_mask_placeholder(call.get("attention_mask")):
        return wrapped(*args, **kwargs)
    call["attention_mask"] = None
    return wrapped(**call)


def _patch(model, patcher, options) -> None:
    if not _legacy(model):
        return
    decoder = model.model if isinstance(getattr(model, "model", None), torch.nn.Module) else model.base_model
    for layer in decoder.layers:
        packed_attention(patcher, layer.self_attention, _packed_forward, backend=options.backend)
    if model.base_model is model:
        patcher.wrap_method(model, "forward", _drop_mask_placeholder)


register(
    PatchEntry(
        family="jetmoe",
        model_types=("jetmoe",),
        test_configs=_configs,
        refuse=refuse_length_dependent_rope,
        routes_attention=lambda model: not _legacy(model),
        patch=_patch,
        notes="mixture-of-attention experts, MoE; 4.57: legacy attention classes wrapped per instance",
    )
)
