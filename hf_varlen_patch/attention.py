"""The attention function a patched model runs, registered in transformers' AttentionInterface.

A patched model's config names ``hf_varlen:<backend>:<original>``. Its attention function:
  - with boundaries in the kwargs (a packed forward): flattens q, k, v and calls the chosen
    varlen backend, ignoring the attention mask (the boundaries say everything it would);
  - without (an unpacked forward, generation with a cache): calls the original implementation
    with the original arguments, so unpacked behaviour is exactly upstream's.
The matching mask function is the original's, so unpacked masks are built as before.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch

from .backends import AttentionSpec, select_backend
from .boundaries import Boundaries
from .context import BOUNDARIES_KWARG, boundaries_for
from .errors import BackendUnavailableError, BoundariesLostError, PackedCallError, VarlenPatchError
from .guards import refuse_unpackable

__all__ = [
    "BOUNDARIES_KWARG",
    "CHUNK_KWARG",
    "implementation_name",
    "parse_implementation",
    "register_implementation",
    "packed_mask_placeholder",
    "is_packed_mask_placeholder",
    "varlen_attention",
]

#: Chunked attention (a token attends within its chunk of this many tokens from its sequence's
#: start): an entry adds it to the kwargs of the layers that use it.
CHUNK_KWARG = "varlen_attention_chunk"
PREFIX = "hf_varlen"

#: How many packed attention calls each backend served (eager calls only; for reports).
BACKEND_USAGE: Counter[str] = Counter()


def implementation_name(backend: str, original: str) -> str:
    """The ``config._attn_implementation`` value of a patched model."""
    return f"{PREFIX}:{backend}:{original}"


def parse_implementation(name: str | None) -> tuple[str, str] | None:
    """(backend, original) for a patched implementation name, else None."""
    if not name or not name.startswith(PREFIX + ":"):
        return None
    _, backend, original = name.split(":", 2)
    return backend, original


def packed_mask_placeholder(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """A zero-memory 4-D mask handed to the model in packed mode.

    transformers returns a 4-D mask unchanged, so no (T, T) mask is ever built. Every element is
    False ("attend nowhere"): a layer that used it instead of the boundaries would fail loudly,
    and :func:`is_packed_mask_placeholder` lets the attention function tell it apart.
    """
    return torch.zeros((), dtype=torch.bool, device=device).expand(batch, 1, length, length)


def is_packed_mask_placeholder(mask: Any) -> bool:
    if not (isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.dtype == torch.bool and mask.shape[-1] > 1):
        return False
    if torch.compiler.is_compiling():
        # traced tensors do not keep the zero strides; inside a packed forward the mask the base
        # model got is always the placeholder, so a 4-D boolean mask of the batch's shape is it
        boundaries = boundaries_for()
        if boundaries is None:
            return False
        batch, length = boundaries.shape
        return mask.shape[0] == batch and mask.shape[2] == length and mask.shape[3] == length
    return all(stride == 0 for stride in mask.stride())


def _original_function(original: str, module: torch.nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if original == "eager":
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise VarlenPatchError(
                f"{type(module).__name__} has no module-level eager_attention_forward to fall back on."
            )
        return fn
    return ALL_ATTENTION_FUNCTIONS[original]


def spec_from_kwargs(module: torch.nn.Module, kwargs: dict[str, Any]) -> AttentionSpec:
    """Read what the layer asks for from the kwargs transformers passes to attention functions."""
    refuse_unpackable(kwargs, cross_attention=())
    # module.is_causal is what the layer is; the is_causal kwarg is often only an SDPA dispatch
    # hint (GPT-2 on 4.57 passes False whenever a mask exists), so it is the fallback.
    is_causal = getattr(module, "is_causal", None)
    if is_causal is None:
        is_causal = kwargs.get("is_causal", True)
    softcap = kwargs.get("softcap")
    return AttentionSpec(
        causal=bool(is_causal),
        scale=kwargs.get("scaling"),
        window=kwargs.get("sliding_window"),
        softcap=softcap if softcap else None,
        dropout=float(kwargs.get("dropout") or 0.0),
        sinks=kwargs.get("s_aux"),
    )


def varlen_attention(
    backend: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    boundaries: Boundaries,
    spec: AttentionSpec,
) -> torch.Tensor:
    """Packed attention on transformers' layout: q (B, Hq, T, D), k/v (B, Hk, T, D) -> (B, T, Hq, Dv).

    Under sequence parallel (the boundaries of one rank's slice) the heads travel to the tokens and
    back around this same call (:func:`hf_varlen_patch.sequence_parallel.ulysses_attention`), or
    the rank's queries attend over gathered keys and values
    (:func:`hf_varlen_patch.sequence_parallel.gathered_kv_attention`)."""
    shard = getattr(boundaries, "shard", None)
    if shard is not None:
        from .sequence_parallel import gathered_kv_attention, ulysses_attention, uses_ulysses

        if not uses_ulysses(shard, query.shape[1]):
            return gathered_kv_attention(query, key, value, shard, spec)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, whole: Boundaries, spec: AttentionSpec):
            return varlen_attention(backend, q, k, v, whole, spec)

        return ulysses_attention(attend, query, key, value, shard, spec)
    batch, num_heads, length, _ = query.shape
    if key.shape[2] != length:
        raise VarlenPatchError(
            f"the keys hold {key.shape[2]} tokens for {length} queries: packed inputs need self-attention "
            "over an empty cache (pass use_cache=False or no cache; cross-attention inputs such as "
            "encoder_hidden_states cannot be packed)."
        )
    if (batch, length) != boundaries.shape:
        raise VarlenPatchError(
            f"the boundaries describe {boundaries.shape} tokens but attention sees {(batch, length)}."
        )
    if query.dtype == torch.float32 and torch.is_autocast_enabled(query.device.type):
        # rotary embeddings in fp32 lift q/k out of the autocast dtype; half-precision kernels
        # need them back in it (as transformers' flash path does).
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    q = query.transpose(1, 2).reshape(batch * length, num_heads, -1)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], -1)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], -1)
    if boundaries.blocks is not None:
        # transformers' block_sequence_ids lie over its causal mask, whatever the layer's is_causal
        # says (PaliGemma's layers say bidirectional: only its mask makes the suffix causal)
        spec = dataclasses.replace(spec, causal=True)
    needed = spec.features(q.shape[1], k.shape[1], q.shape[-1], v.shape[-1])
    if boundaries.blocks is not None:
        needed = needed | {"bidirectional_blocks"}
    chosen = select_backend(backend, q.device, q.dtype, needed)
    try:
        out = chosen.fn(q, k, v, boundaries, spec)
    except BackendUnavailableError as err:
        if backend != "auto" or chosen.name == "sdpa":
            raise
        # the kernel found it cannot run this configuration only when called: auto takes the exact reference
        _log_fallback(chosen.name, err)
        chosen = select_backend("sdpa", q.device, q.dtype, needed)
        out = chosen.fn(q, k, v, boundaries, spec)
    if not torch.compiler.is_compiling():
        BACKEND_USAGE[chosen.name] += 1
    # contiguous: callers .view() the result, and kernels may return strided outputs for B=1
    return out.contiguous().view(batch, length, num_heads, -1)


_FELL_BACK: set[str] = set()


def _log_fallback(name: str, err: Exception) -> None:
    import logging

    if name not in _FELL_BACK:
        _FELL_BACK.add(name)
        logging.getLogger("hf_varlen_patch").warning(
            "hf_varlen_patch: backend %r could not run a layer (%s); auto uses the exact sdpa reference there.",
            name,
            str(err).splitlines()[0][:200],
        )


def _make_attention_function(backend: str, original: str) -> Callable:
    def hf_varlen_attention_forward(module, query, key, value, attention_mask, **kwargs):
        boundaries = kwargs.get(BOUNDARIES_KWARG)
        selected = _selected_keys(query, kwargs)
        if boundaries is None:
            if is_packed_mask_placeholder(attention_mask):
                raise BoundariesLostError(
                    f"a packed forward reached {type(module).__name__} without its boundaries: "
                    "this architecture does not pass keyword arguments down to attention. It "
                    "needs an entry in hf_varlen_patch/patches; please report it."
                )
            if selected is not None and original in ("eager", "sdpa"):
                # upstream merges the indexer's key selection into the mask for eager/sdpa only (it
                # asks the implementation's name, which is this function's now): do as it does
                attention_mask = _with_selected_keys(attention_mask, selected, query.dtype)
                kwargs = {k: v for k, v in kwargs.items() if k != SELECTED_KEYS_KWARG}
            return _original_function(original, module)(module, query, key, value, attention_mask, **kwargs)
        if selected is not None:
            _refuse_key_selection(module, selected, boundaries)
        spec = spec_from_kwargs(module, kwargs)
        chunk = kwargs.get(CHUNK_KWARG)
        if chunk:
            boundaries = boundaries.chunked(chunk)
        return varlen_attention(backend, query, key, value, boundaries, spec), None

    hf_varlen_attention_forward.__qualname__ = f"hf_varlen_attention_forward[{backend}:{original}]"
    return hf_varlen_attention_forward


#: What sparse-attention layers (DeepSeek-V3.2's DSA indexer and kin) hand attention: the key
#: indices each query attends to, (B, S, k), consumed by sparse kernels, ignored by eager and SDPA.
SELECTED_KEYS_KWARG = "indices"


def _selected_keys(query: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor | None:
    selected = kwargs.get(SELECTED_KEYS_KWARG)
    batch, _, length, _ = query.shape
    if isinstance(selected, torch.Tensor) and selected.ndim == 3 and tuple(selected.shape[:2]) == (batch, length):
        if not selected.is_floating_point():
            return selected
    return None


def _with_selected_keys(mask: torch.Tensor, selected: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``mask`` (B, 1, S, T) with every key the indexer did not select (``selected``: (B, S, k)
    key indices per query) masked out, as upstream builds it for eager and sdpa attention."""
    batch, length = selected.shape[:2]
    unselected = (
        selected.new_ones((batch, length, mask.shape[-1]), dtype=torch.bool).scatter(-1, selected.long(), False)
    ).unsqueeze(1)
    if mask.dtype == torch.bool:
        return mask & ~unselected
    return mask.masked_fill(unselected, torch.finfo(dtype).min)


def _refuse_key_selection(module: torch.nn.Module, selected: torch.Tensor, boundaries: Boundaries) -> None:
    """Sparse attention (an indexer picks the top ``k`` keys per query) packs exactly only while
    every sequence has at most ``k`` tokens: its selection is then every causal key, which the
    varlen kernels attend to; longer ones would need the selection, which they cannot take."""
    top_k = int(selected.shape[-1])
    if boundaries.max_seqlen > top_k:
        raise PackedCallError(
            f"{type(module).__name__} attends to the {top_k} keys its indexer picks per query, and this packed "
            f"batch has a sequence of {boundaries.max_seqlen} tokens: the varlen kernels cannot take the selection. "
            f"Pack sequences of at most {top_k} tokens (then every causal key is selected and the result is "
            "exact), or run longer ones unpacked."
        )


def register_implementation(backend: str, original: str) -> str:
    """Register ``hf_varlen:<backend>:<original>`` (attention and mask functions); return the name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    name = implementation_name(backend, original)
    if name not in ALL_ATTENTION_FUNCTIONS._global_mapping:
        ALL_ATTENTION_FUNCTIONS.register(name, _make_attention_function(backend, original))
    mask_mapping = ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    if original in mask_mapping and name not in mask_mapping:
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, mask_mapping[original])
    return name
