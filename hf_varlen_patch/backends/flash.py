"""flash-attn's ``flash_attn_varlen_func``: FA3 (``flash_attn_interface``), FA4
(``flash_attn.cute``) or FA2 (``flash_attn``), whichever is importable, in that order.

The three releases share the core arguments by name (q, k, v, cu_seqlens_q/k, max_seqlen_q/k,
softmax_scale, causal), not by position, and differ in the rest; the adapter maps the spec onto the parameters
the installed function declares, so a feature is claimed only where the signature has it.
"""

from __future__ import annotations

import functools
import importlib
import inspect

import torch

from ..boundaries import Boundaries
from . import AttentionSpec, Backend, register_backend

#: (module, attribute) candidates, fastest first.
CANDIDATES = (
    ("flash_attn_interface", "flash_attn_varlen_func"),
    ("flash_attn.cute", "flash_attn_varlen_func"),
    ("flash_attn", "flash_attn_varlen_func"),
)


@functools.cache
def _flash() -> tuple[object, dict[str, inspect.Parameter], str] | None:
    for module_name, attr in CANDIDATES:
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, OSError, RuntimeError):
            continue
        return fn, dict(inspect.signature(fn).parameters), module_name
    return None


def _features() -> frozenset[str]:
    found = _flash()
    if found is None:
        return frozenset()
    params = found[1]
    feats = {"causal", "bidirectional", "gqa"}
    if "window_size" in params or "window_size_left" in params:
        feats.add("sliding_window")
    if "softcap" in params:
        feats.add("softcap")
    if "dropout_p" in params:
        feats.add("dropout")
    if "alibi_slopes" in params:
        feats.add("alibi")
    if "learnable_sink" in params:
        feats.add("sinks")
    return frozenset(feats)


def _availability(device: torch.device, dtype: torch.dtype) -> str | None:
    if _flash() is None:
        return "flash-attn is not installed (pip install 'hf-varlen-patch[flash]')"
    if device.type != "cuda":
        return f"flash-attn runs on CUDA only, not {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn takes float16/bfloat16, not {dtype}"
    return None


def _window(params: dict[str, inspect.Parameter], spec: AttentionSpec) -> dict:
    unbounded = -1
    default = params.get("window_size")
    if default is not None and isinstance(default.default, tuple) and default.default[0] is None:
        unbounded = None  # FA4 spells "no window" as None
    left = spec.window - 1 if spec.window is not None else unbounded
    right = 0 if spec.causal else left
    if "window_size" in params:
        return {"window_size": (left, right)}
    if "window_size_left" in params:
        return {"window_size_left": left, "window_size_right": right}
    return {}


def flash_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, boundaries: Boundaries, spec: AttentionSpec
) -> torch.Tensor:
    fn, params, _ = _flash()
    kwargs: dict = {"causal": spec.causal}
    if spec.scale is not None:
        kwargs["softmax_scale"] = spec.scale
    kwargs.update(_window(params, spec))
    if spec.softcap:
        kwargs["softcap"] = spec.softcap
    if spec.dropout:
        kwargs["dropout_p"] = spec.dropout
    if spec.alibi_slopes is not None:
        kwargs["alibi_slopes"] = spec.alibi_slopes.to(torch.float32)
    if spec.sinks is not None:
        kwargs["learnable_sink"] = spec.sinks
    cu, max_len = boundaries.cu_seqlens, boundaries.max_seqlen
    # by keyword: the releases agree on these names, not on positions (FA4's fourth parameter is ``qv``)
    out = fn(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len, **kwargs)
    return out[0] if isinstance(out, tuple) else out


register_backend(
    Backend(
        name="flash_attn",
        fn=flash_varlen_attention,
        features=_features,
        availability=_availability,
        description="flash-attn flash_attn_varlen_func (FA3, FA4 or FA2; CUDA, fp16/bf16)",
    )
)
