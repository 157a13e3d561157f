"""TrOCR's decoder as a causal LM: learned (or sinusoidal) positions from an ``arange`` over the
row, and self-attention that computes itself.

In a packed forward the position table is re-indexed per sequence
(:func:`~hf_varlen_patch.patching.index_positions_per_sequence`) and each self-attention module
projects as upstream does (queries pre-scaled) and attends through the varlen backend. The
decoder layer calls its attention without keyword arguments, so the boundaries come from the
packed forward's context; a call that carries the packed mask placeholder without them
(gradient-checkpoint recomputation) raises instead of attending across sequences. TrOCR does not
shift ``labels`` inside its loss. On transformers 4.57 its causal LM takes no ``position_ids``:
the patched forward accepts them anyway, and the decoder layers are tracked
(:func:`~hf_varlen_patch.patching.track_layer`) so that checkpoint recomputation, which runs
outside the forward, finds the boundaries again.
"""

from __future__ import annotations

from hf_varlen_patch.attention import is_packed_mask_placeholder, varlen_attention
from hf_varlen_patch.backends import AttentionSpec
from hf_varlen_patch.errors import BoundariesLostError, VarlenPatchError
from hf_varlen_patch.patching import (
    cache_of,
    call_as_kwargs,
    current_boundaries,
    index_positions_per_sequence,
    track_layer,
)
from hf_varlen_patch.registry import PatchEntry, register

from ._legacy_attention import PackedOutputAttentionsError


def _self_attention(backend: str):
    def wrapper(wrapped, instance, args, kwargs):
        call = call_as_kwargs(wrapped, args, kwargs)
        boundaries = current_boundaries()
        if boundaries is None:
            if is_packed_mask_placeholder(call.get("attention_mask")):
                raise BoundariesLostError(
                    "a packed TrOCR forward is recomputed without its boundaries (gradient checkpointing); "
                    "train packed TrOCR without gradient checkpointing."
                )
            return wrapped(*args, **kwargs)
        if call.get("key_value_states") is not None:
            raise VarlenPatchError("cross-attention (encoder_hidden_states) cannot be packed.")
        if call.get("output_attentions"):
            raise PackedOutputAttentionsError("output_attentions=True is not available with packed inputs.")
        hidden = call["hidden_states"]
        batch, length, width = hidden.shape
        shape = (batch, length, instance.num_heads, instance.head_dim)
        q = (instance.q_proj(hidden) * instance.scaling).view(shape).transpose(1, 2)
        k = instance.k_proj(hidden).view(shape).transpose(1, 2)
        v = instance.v_proj(hidden).view(shape).transpose(1, 2)
        cache = cache_of(call)
        if cache is not None:
            cache = getattr(cache, "self_attention_cache", cache)
            k, v = cache.update(k, v, instance.layer_idx)
        spec = AttentionSpec(causal=True, scale=1.0, dropout=instance.dropout if instance.training else 0.0)
        out = varlen_attention(backend, q, k, v, boundaries, spec)
        return instance.out_proj(out.reshape(batch, length, width)), None

    return wrapper


def _patch(model, patcher, options) -> None:
    for name, module in model.named_modules():
        if name.endswith("embed_positions"):
            index_positions_per_sequence(patcher, module)
        elif name.endswith("self_attn"):
            patcher.wrap_method(module, "forward", _self_attention(options.backend))
        elif hasattr(module, "self_attn"):
            track_layer(patcher, module)


register(
    PatchEntry(
        family="trocr",
        model_types=("trocr",),
        generic=False,
        patch=_patch,
        shifts_labels=False,
        notes="positions re-indexed per sequence; own self-attention wrapped per instance; labels not shifted",
    )
)
