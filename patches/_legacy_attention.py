"""Instance-level wrappers for attention modules that the generic route cannot reach.

Two cases, both keyed on ``position_ids``: a patched forward registers its boundaries against
that very tensor, and every decoder layer hands it on to its attention module, also during
gradient-checkpoint recomputation (:func:`~hf_varlen_patch.context.boundaries_for`).

- :func:`pass_boundaries`: the module calls transformers' AttentionInterface, but its decoder
  layer drops the keyword arguments (so ``varlen_boundaries`` never arrives). The wrapper adds
  them back (plus any attention kwargs the module forgets, such as a sliding window).
- :func:`packed_attention`: a 4.57 legacy attention class (eager/sdpa/flash picked by name at
  construction) that computes attention itself. In a packed forward the wrapper runs a short
  model-specific re-implementation (projections, rotary, output) whose attention call goes
  through the varlen backend; otherwise it runs the original forward untouched.

And :func:`keep_packed_mask` for 4.57 base models that take ``**kwargs`` but still build their
mask with the legacy ``_update_causal_mask``. (The rotary refusal is in ``_rope.py``.)
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from hf_varlen_patch.attention import is_packed_mask_placeholder, varlen_attention
from hf_varlen_patch.backends import AttentionSpec
from hf_varlen_patch.patching import Patcher, attach_boundaries, cache_of, call_as_kwargs, wrap_packed_calls

__all__ = [
    "Attend",
    "modeling_module",
    "pass_boundaries",
    "packed_attention",
    "llama_style_forward",
    "llama_style_qkv",
    "keep_packed_mask",
]


#: ``attend(q, k, v, spec, cache_kwargs, after_cache=None)``: q (B, Hq, T, D), k/v (B, Hk, T, D)
#: after rotary and before the cache; updates the cache if the call has one, then applies
#: ``after_cache(k, v) -> (k, v)`` if given; returns (B, T, Hq, Dv).
Attend = Callable[..., torch.Tensor]


def modeling_module(instance: torch.nn.Module):
    """The ``modeling_*`` module that defines ``instance``'s class (for its rotary helpers)."""
    return sys.modules[type(instance).__module__]


def pass_boundaries(
    patcher: Patcher,
    module: torch.nn.Module,
    extra: Callable[[torch.nn.Module], dict] | None = None,
) -> None:
    """Wrap ``module.forward`` so a packed call carries ``varlen_boundaries`` (and ``extra(module)``):
    the engine's :func:`~hf_varlen_patch.patching.attach_boundaries` (kwargs, ``position_ids``, or
    the running packed forward). Unpacked calls are passed through unchanged."""
    attach_boundaries(patcher, module, extra)


def packed_attention(
    patcher: Patcher,
    module: torch.nn.Module,
    forward: Callable[[torch.nn.Module, dict, Attend], Any],
    *,
    backend: str,
    layer_idx: str = "layer_idx",
) -> None:
    """Wrap a legacy attention module: packed calls run ``forward(instance, call, attend)``.

    ``call`` holds the original call's arguments by name; ``forward`` projects q/k/v exactly as the
    upstream class does, calls ``attend`` and returns what the upstream forward returns.
    ``layer_idx`` names the instance attribute that indexes the cache.
    """

    def packed(wrapped, instance, call, boundaries):
        past = cache_of(call)

        def attend(q, k, v, spec: AttentionSpec, cache_kwargs: dict | None = None, *, after_cache=None):
            if past is not None:
                k, v = past.update(k, v, getattr(instance, layer_idx), cache_kwargs)
            if after_cache is not None:  # what upstream does to k/v between the cache and attention
                k, v = after_cache(k, v)
            return varlen_attention(backend, q, k, v, boundaries, spec)

        return forward(instance, call, attend)

    wrap_packed_calls(patcher, module, "forward", packed)


def llama_style_qkv(self: torch.nn.Module, call: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """q, k, v (B, H, T, D) of a 4.57 Llama-style legacy attention class after the model's own
    ``apply_rotary_pos_emb`` (partial rotary included) on its layer's ``position_embeddings``, and
    the cache kwargs."""
    hidden = call["hidden_states"]
    batch, length, _ = hidden.shape
    q = self.q_proj(hidden).view(batch, length, -1, self.head_dim).transpose(1, 2)
    k = self.k_proj(hidden).view(batch, length, -1, self.head_dim).transpose(1, 2)
    v = self.v_proj(hidden).view(batch, length, -1, self.head_dim).transpose(1, 2)
    cos, sin = call["position_embeddings"]
    q, k = modeling_module(self).apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v, {"sin": sin, "cos": cos, "cache_position": call.get("cache_position")}


def llama_style_forward(self: torch.nn.Module, call: dict, attend: Attend) -> Any:
    """The packed forward of a 4.57 Llama-style legacy attention class (for :func:`packed_attention`):
    :func:`llama_style_qkv`, default scaling, ``o_proj``."""
    q, k, v, cache_kwargs = llama_style_qkv(self, call)
    spec = AttentionSpec(causal=True, dropout=self.attention_dropout if self.training else 0.0)
    out = attend(q, k, v, spec, cache_kwargs)
    return self.o_proj(out.reshape(*q.shape[:1], q.shape[2], -1)), None


def keep_packed_mask(patcher: Patcher, base: torch.nn.Module) -> None:
    """Let the packed mask placeholder through a 4.57 legacy ``_update_causal_mask`` untouched.

    A base model that takes ``**kwargs`` gets the engine's zero-memory 4-D placeholder as its
    ``attention_mask``. The legacy mask builders (copied from GPT-J) process it: with sdpa on
    CUDA ``AttentionMaskConverter._unmask_unattended`` raises on a bool mask, and with
    flash_attention_2 ``(mask == 0.0).any()`` materialises B x T x T. Packed attention ignores the
    mask anyway, so in a packed forward the placeholder is returned as the layers' mask.
    """
    if not callable(getattr(base, "_update_causal_mask", None)):
        return

    def wrapper(wrapped, instance, args, kwargs):
        mask = call_as_kwargs(wrapped, args, kwargs).get("attention_mask")
        if is_packed_mask_placeholder(mask):
            return mask
        return wrapped(*args, **kwargs)

    patcher.wrap_method(base, "_update_causal_mask", wrapper)
