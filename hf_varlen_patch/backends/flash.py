"""flash-attn's ``flash_attn_varlen_func``: FA3 (``flash_attn_interface``), FA4
(``flash_attn.cute``) or FA2 (``flash_attn``), whichever is importable, in that order.

The three releases share the core arguments by name (q, k, v, cu_seqlens_q/k, max_seqlen_q/k,
softmax_scale, causal), not by position, and differ in the rest; the adapter maps the spec onto the parameters
the installed function declares, so a feature is claimed only where the signature has it.

torch.compile: FA2 and FA3 register their kernels as torch custom ops themselves, so dynamo
traces their Python entry into the graph. FA4's entry is Python (CuTe DSL JIT) that dynamo cannot
trace, so here it runs as the custom ops ``hf_varlen::flash_cute_varlen_fwd`` / ``_bwd`` (fake
implementations and backward registered): a compiled patched model keeps one graph, in eager
mode the ops cost one dispatch each.
"""

from __future__ import annotations

import importlib
import inspect

import torch

from ..boundaries import Boundaries
from ..errors import BackendUnavailableError
from .base import AttentionSpec, Backend, register_backend

#: (module, attribute) candidates, fastest first.
CANDIDATES = (
    ("flash_attn_interface", "flash_attn_varlen_func"),
    ("flash_attn.cute", "flash_attn_varlen_func"),
    ("flash_attn", "flash_attn_varlen_func"),
)
#: The module whose entry is not traceable and goes through this module's custom ops.
CUTE = "flash_attn.cute"
#: FA4's gradients are wrong below this head dim (scripts/fa4_grad_probe.py; benchmarks/fa4_head_dim.md):
#: training there is refused, so ``auto`` takes another backend for those layers.
CUTE_MIN_TRAIN_HEAD_DIM = 32

#: What was found: "found" -> (function, its parameters, module name) or None; "cute_bwd" -> FA4's backward.
_FOUND: dict[str, object] = {}


def _find() -> tuple[object, dict[str, inspect.Parameter], str] | None:
    for module_name, attr in CANDIDATES:
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, OSError, RuntimeError):
            continue
        return fn, dict(inspect.signature(fn).parameters), module_name
    return None


def _flash() -> tuple[object, dict[str, inspect.Parameter], str] | None:
    """(function, its parameters, module name) of the installed flash-attn, looked up once.

    A plain memo rather than functools.cache, which dynamo warns about at every traced call;
    ``apply`` looks it up before any forward, so compiled code never imports."""
    if "found" not in _FOUND:
        _FOUND["found"] = _find()
    return _FOUND["found"]


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
    fn, params, module_name = _flash()
    cu, max_len = boundaries.cu_seqlens, boundaries.max_seqlen
    if module_name == CUTE:
        if q.shape[-1] < CUTE_MIN_TRAIN_HEAD_DIM and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            raise BackendUnavailableError(
                f"FlashAttention-4's backward is wrong for {q.shape[-1]}-dim heads (scripts/fa4_grad_probe.py); "
                f"heads of at least {CUTE_MIN_TRAIN_HEAD_DIM} train on it and inference runs; pick another backend "
                "for narrower heads"
            )
        left, right = _window(params, spec).get("window_size", (None, None))
        out, _ = torch.ops.hf_varlen.flash_cute_varlen_fwd(
            q,
            k,
            v,
            cu,
            max_len,
            spec.scale if spec.scale is not None else q.shape[-1] ** -0.5,
            spec.causal,
            left,
            right,
            float(spec.softcap or 0.0),
            spec.sinks,
        )
        return out
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
    # by keyword: the releases agree on these names, not on positions (FA4's fourth parameter is ``qv``)
    out = fn(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len, **kwargs)
    return out[0] if isinstance(out, tuple) else out


# ------------------------------------------------------------------ FA4 as custom ops


def _cute_backward_kernel():
    """FA4's backward entry (``flash_attn.cute.interface._flash_attn_bwd``, private in 4.0.0b36),
    looked up once where the installed ``flash_attn_varlen_func`` is defined."""
    if "cute_bwd" not in _FOUND:
        _FOUND["cute_bwd"] = importlib.import_module(_flash()[0].__module__)._flash_attn_bwd
    return _FOUND["cute_bwd"]


@torch.library.custom_op("hf_varlen::flash_cute_varlen_fwd", mutates_args=())
def _cute_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    causal: bool,
    window_left: int | None,
    window_right: int | None,
    softcap: float,
    sinks: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FA4 varlen forward: (out (N, Hq, Dv), lse (Hq, N) float32, which the backward needs)."""
    try:
        out, lse = _flash()[0](
            q,
            k,
            v,
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_k=cu_seqlens,
            max_seqlen_q=max_seqlen,
            max_seqlen_k=max_seqlen,
            softmax_scale=scale,
            causal=causal,
            window_size=(window_left, window_right),
            learnable_sink=sinks,
            softcap=softcap,
            return_lse=True,
        )
    except (AssertionError, NotImplementedError) as err:  # how FA4 says a configuration is not built
        raise BackendUnavailableError(
            f"FlashAttention-4 cannot run this layer (head dims {q.shape[-1]}/{v.shape[-1]}, {q.dtype}): {err}"
        ) from err
    return out, lse


@_cute_fwd.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale, causal, window_left, window_right, softcap, sinks):
    out = q.new_empty((q.shape[0], q.shape[1], v.shape[-1]))
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return out, lse


@torch.library.custom_op("hf_varlen::flash_cute_varlen_bwd", mutates_args=())
def _cute_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    causal: bool,
    window_left: int | None,
    window_right: int | None,
    softcap: float,
    sinks: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """FA4 varlen backward: (dq, dk, dv, dsinks); dsinks is empty without sinks."""
    grads = _cute_backward_kernel()(
        q,
        k,
        v,
        out,
        grad_out.contiguous(),
        lse,
        scale,
        causal,
        softcap,
        window_size_left=window_left,
        window_size_right=window_right,
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen,
        max_seqlen_k=max_seqlen,
        learnable_sink=sinks,
    )
    dq, dk, dv = grads[:3]
    dsinks = grads[3].to(sinks.dtype) if sinks is not None else q.new_empty(0)
    return dq, dk, dv, dsinks


@_cute_bwd.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale, causal, window_left, window_right, softcap, sinks):
    dsinks = torch.empty_like(sinks) if sinks is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks


_CUTE_OPTIONS = ("max_seqlen", "scale", "causal", "window_left", "window_right", "softcap")


def _cute_setup_context(ctx, inputs, output) -> None:
    q, k, v, cu_seqlens, *options, sinks = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens, sinks)
    ctx.options = options


def _cute_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = torch.ops.hf_varlen.flash_cute_varlen_bwd(
        grad_out, q, k, v, out, lse, cu_seqlens, *ctx.options, sinks
    )
    return dq, dk, dv, None, *(None,) * len(_CUTE_OPTIONS), dsinks if sinks is not None else None


_cute_fwd.register_autograd(_cute_backward, setup_context=_cute_setup_context)


register_backend(
    Backend(
        name="flash_attn",
        fn=flash_varlen_attention,
        features=_features,
        availability=_availability,
        description="flash-attn flash_attn_varlen_func (FA3, FA4 or FA2; CUDA, fp16/bf16)",
    )
)
