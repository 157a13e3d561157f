"""Open-Llama (transformers 4.57, deprecated there; gone in 5.x): rotary attention computed in its
own class, which rotates by the ``position_ids`` it is passed, with a legacy tuple cache.

The base model takes no ``**kwargs``, so each attention module is wrapped on this instance
(:func:`~patches._legacy_attention.packed_attention`, boundaries found by ``position_ids``): a
packed call projects and rotates as upstream and attends through the varlen backend.
"""

from __future__ import annotations

from hf_varlen_patch.backends import AttentionSpec
from hf_varlen_patch.context import boundaries_for
from hf_varlen_patch.errors import VarlenPatchError
from hf_varlen_patch.registry import PatchEntry, register

from ._legacy_attention import modeling_module, packed_attention
from ._rope import refuse_length_dependent_rope


def _packed_forward(self, call: dict, attend):
    if call.get("past_key_values") is not None:
        raise VarlenPatchError("packed inputs need an empty cache (pass use_cache=False or no past_key_values).")
    hidden = call["hidden_states"]
    batch, length, _ = hidden.shape
    q = self.q_proj(hidden).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
    k = self.k_proj(hidden).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
    v = self.v_proj(hidden).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
    # a table for every position of the forward (a slice under sequence parallel holds later ones)
    cos, sin = self.rotary_emb(v, seq_len=boundaries_for().position_bound)
    q, k = modeling_module(self).apply_rotary_pos_emb(q, k, cos, sin, call["position_ids"])
    spec = AttentionSpec(causal=True, dropout=self.dropout_prob if self.training else 0.0)
    out = attend(q, k, v, spec)
    present = (k, v) if call.get("use_cache") else None
    return self.o_proj(out.reshape(batch, length, self.hidden_size)), None, present


def _patch(model, patcher, options) -> None:
    for layer in model.base_model.layers:
        packed_attention(patcher, layer.self_attn, _packed_forward, backend=options.backend)


register(
    PatchEntry(
        family="open_llama",
        model_types=("open-llama",),
        routes_attention=False,
        patch=_patch,
        refuse=refuse_length_dependent_rope,
        notes="4.57 only: rotary by position_ids; own attention class wrapped per instance",
    )
)
