"""PyTorch's own varlen kernel: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16).

Its signature moved between releases: 2.10 took ``is_causal``, 2.11 a flash-style
``window_size=(left, right)`` (causal is ``(-1, 0)``), 2.13 added ``enable_gqa``. The adapter
reads the installed signature once and maps the spec onto whichever form is there; without
``enable_gqa`` it repeats the key/value heads.
"""

from __future__ import annotations

import inspect

import torch

from ..boundaries import Boundaries
from .base import AttentionSpec, Backend, register_backend


def _find_varlen() -> tuple[object, frozenset[str]] | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


#: Read once at import, not through functools.cache: dynamo warns at every cached call it traces.
#: ``varlen_attn`` is a torch custom op with its own fake and backward, so compiled graphs keep it.
_VARLEN = _find_varlen()


def _varlen() -> tuple[object, frozenset[str]] | None:
    return _VARLEN


def _features() -> frozenset[str]:
    found = _varlen()
    if found is None:
        return frozenset()
    params = found[1]
    feats = {"causal", "bidirectional", "gqa"}
    if "window_size" in params:
        feats.add("sliding_window")
    elif "is_causal" not in params:
        feats.discard("causal")
    return frozenset(feats)


def _availability(device: torch.device, dtype: torch.dtype) -> str | None:
    if _varlen() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (needs torch >= 2.10)"
    if device.type != "cuda":
        return f"varlen_attn runs on CUDA only, not {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"varlen_attn takes float16/bfloat16, not {dtype}"
    return None


def torch_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, boundaries: Boundaries, spec: AttentionSpec
) -> torch.Tensor:
    varlen_attn, params = _varlen()
    kwargs: dict = {}
    if spec.scale is not None:
        kwargs["scale"] = spec.scale
    if "window_size" in params:
        left = spec.window - 1 if spec.window is not None else -1
        right = 0 if spec.causal else (spec.window - 1 if spec.window is not None else -1)
        kwargs["window_size"] = (left, right)
    else:
        kwargs["is_causal"] = spec.causal
    hq, hk = q.shape[1], k.shape[1]
    if hq != hk:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(hq // hk, dim=1)
            v = v.repeat_interleave(hq // hk, dim=1)
    cu, max_len = boundaries.cu_seqlens, boundaries.max_seqlen
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)
    return out[0] if isinstance(out, tuple) else out


register_backend(
    Backend(
        name="torch",
        fn=torch_varlen_attention,
        features=_features,
        availability=_availability,
        description="torch.nn.attention.varlen.varlen_attn (CUDA, fp16/bf16)",
    )
)
