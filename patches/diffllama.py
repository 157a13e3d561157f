"""DiffLlama: differential attention (two softmax maps over paired heads, their difference
weighted by a learned lambda, then a group norm).

On 5.x its attention goes through the AttentionInterface and the generic route is all it
takes. On 4.57 the attention classes are picked by name at construction
(``DIFFLLAMA_ATTENTION_CLASSES``) and compute attention themselves: each attention module is
wrapped on this instance (:func:`~patches._legacy_attention.packed_attention`); a packed call
projects and rotates as upstream, pairs the value heads the same way, attends through the varlen
backend (one call over all heads) and combines the two maps as upstream does.
"""

from __future__ import annotations

import torch

from hf_varlen_patch.backends import AttentionSpec
from hf_varlen_patch.registry import PatchEntry, register

from ._legacy_attention import llama_style_qkv, modeling_module, packed_attention
from ._rope import refuse_length_dependent_rope


def _legacy(model) -> bool:
    return hasattr(modeling_module(model), "DIFFLLAMA_ATTENTION_CLASSES")


def _paired_values(self):
    """Upstream's value layout: each head carries its own and its pair's values (2 x head_dim)."""
    repeat_kv = modeling_module(self).repeat_kv

    def transform(k, v):
        v = repeat_kv(v, self.num_key_value_groups)
        v = torch.cat(torch.chunk(v, 2, dim=1), dim=-1).repeat(1, 2, 1, 1)
        return repeat_kv(k, self.num_key_value_groups), v

    return transform


def _packed_forward(self, call: dict, attend):
    q, k, v, cache_kwargs = llama_style_qkv(self, call)
    batch, _, length, _ = q.shape
    spec = AttentionSpec(causal=True, dropout=self.attention_dropout if self.training else 0.0)
    out = attend(q, k, v, spec, cache_kwargs, after_cache=_paired_values(self)).transpose(1, 2)
    first, second = torch.chunk(out, 2, dim=1)
    dtype = q.dtype
    lambda_1 = torch.exp(torch.sum(self.lambda_q1 * self.lambda_k1, dim=-1, dtype=torch.float32)).to(dtype)
    lambda_2 = torch.exp(torch.sum(self.lambda_q2 * self.lambda_k2, dim=-1, dtype=torch.float32)).to(dtype)
    combined = first - (lambda_1 - lambda_2 + self.lambda_init) * second
    combined = (1 - self.lambda_init) * self.groupnorm(combined)
    return self.o_proj(combined.transpose(1, 2).reshape(batch, length, -1)), None


def _patch(model, patcher, options) -> None:
    if not _legacy(model):
        return
    for layer in model.base_model.layers:
        packed_attention(patcher, layer.self_attn, _packed_forward, backend=options.backend)


register(
    PatchEntry(
        family="diffllama",
        model_types=("diffllama",),
        routes_attention=lambda model: not _legacy(model),
        patch=_patch,
        refuse=refuse_length_dependent_rope,
        notes="differential attention; 5.x: via AttentionInterface; 4.57: legacy attention classes wrapped "
        "per instance",
    )
)
