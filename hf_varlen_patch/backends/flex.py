"""FlexAttention with a document-causal ``BlockMask`` over the flattened tokens.

Softcap and ALiBi are score modifications; attention sinks are applied afterwards from the
log-sum-exp (``out * sigmoid(lse - sink)`` is exactly softmax with one extra key). FlexAttention
is only fast compiled, so in an eager model the kernel itself is compiled once
(``torch.compile(flex_attention, dynamic=True)``, as transformers does); inside a compiled model
the plain function is traced. The block mask depends on the boundaries and the layer's window,
so it is built once per forward and kind of layer and cached on the boundaries.
"""

from __future__ import annotations

import functools
import inspect
import logging
from functools import partial

import torch

from ..boundaries import Boundaries
from ..errors import BackendUnavailableError
from ..memo import computed_once
from .base import AttentionSpec, Backend, register_backend

logger = logging.getLogger("hf_varlen_patch")


@computed_once
def _flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return flex_attention, create_block_mask


@functools.cache  # eager only (never traced)
def _compiled_kernel():
    return torch.compile(_flex()[0], dynamic=True)


_NOT_COMPILABLE: set[tuple] = set()


def _run(kernel_key: tuple, device: torch.device, *args, **kwargs):
    """The compiled kernel on CUDA in eager models; the plain function inside torch.compile or
    where inductor cannot build this configuration (e.g. head_dim < 16), with a one-time log."""
    if device.type == "cuda" and not torch.compiler.is_compiling() and kernel_key not in _NOT_COMPILABLE:
        try:
            return _compiled_kernel()(*args, **kwargs)
        except Exception as err:  # dynamo/inductor/fake-tensor failures alike; a real input error recurs below
            _NOT_COMPILABLE.add(kernel_key)
            logger.warning(
                "hf_varlen_patch: FlexAttention could not be compiled for %s (%s); running it unfused.",
                kernel_key,
                str(err).splitlines()[0][:200],
            )
    from torch._dynamo.exc import TorchDynamoException

    try:
        return _flex()[0](*args, **kwargs)
    except TorchDynamoException as err:  # eager flex traces its score/mask functions too
        raise BackendUnavailableError(
            f"FlexAttention cannot run {kernel_key} on torch {torch.__version__}: {str(err).splitlines()[0][:200]}"
        ) from err


@computed_once
def _takes_return_aux() -> bool:
    return "return_aux" in inspect.signature(_flex()[0]).parameters


@computed_once
def _mask_takes_compile() -> bool:
    return "_compile" in inspect.signature(_flex()[1]).parameters


def _availability(device: torch.device, dtype: torch.dtype) -> str | None:
    if _flex() is None:
        return f"torch {torch.__version__} has no FlexAttention (needs torch >= 2.5)"
    if device.type == "cpu":
        return "FlexAttention has no backward pass on CPU"
    return None


def _features() -> frozenset[str]:
    if _flex() is None:
        return frozenset()
    return frozenset(
        {
            "causal",
            "bidirectional",
            "sliding_window",
            "softcap",
            "alibi",
            "sinks",
            "gqa",
            "value_head_dim",
            "bidirectional_blocks",
        }
    )


def _block_mask(boundaries: Boundaries, spec: AttentionSpec):
    key = ("flex_block_mask", spec.causal, spec.window)
    cache = boundaries.cache
    if key not in cache:
        _, create_block_mask = _flex()
        seq, blocks = boundaries.seq_idx, boundaries.blocks
        causal, window = spec.causal, spec.window

        def document_mask(b, h, q_idx, kv_idx):
            keep = seq[q_idx] == seq[kv_idx]
            if causal:
                order = q_idx >= kv_idx
                if blocks is not None:  # a block's tokens see each other both ways
                    order = order | ((blocks[q_idx] == blocks[kv_idx]) & (blocks[q_idx] >= 0))
                keep = keep & order
            if window is not None:  # causal: only the past is bounded (a block may look further ahead)
                keep = keep & (q_idx - kv_idx < window)
                if not causal:
                    keep = keep & (kv_idx - q_idx < window)
            return keep

        n = boundaries.total_tokens
        extra = {"_compile": True} if seq.device.type == "cuda" and _mask_takes_compile() else {}
        cache[key] = create_block_mask(document_mask, None, None, n, n, device=seq.device, **extra)
    return cache[key]


def flex_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, boundaries: Boundaries, spec: AttentionSpec
) -> torch.Tensor:
    kernel_key = (
        q.shape[-1],
        v.shape[-1],
        q.shape[1],
        k.shape[1],
        bool(spec.softcap),
        spec.alibi_slopes is not None,
        spec.sinks is not None,
    )
    flex_attention = partial(_run, kernel_key, q.device)
    softcap, slopes = spec.softcap, spec.alibi_slopes
    score_mod = None
    if softcap or slopes is not None:

        def score_mod(score, b, h, q_idx, kv_idx):
            if softcap:
                score = torch.tanh(score / softcap) * softcap
            if slopes is not None:
                score = score - slopes[h] * (q_idx - kv_idx).abs()
            return score

    qf, kf, vf = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    kwargs = dict(
        score_mod=score_mod,
        block_mask=_block_mask(boundaries, spec),
        scale=spec.scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    if spec.sinks is None:
        out = flex_attention(qf, kf, vf, **kwargs)
    elif _takes_return_aux():  # torch >= 2.9 spells "also return the log-sum-exp" this way
        from torch.nn.attention.flex_attention import AuxRequest

        out, aux = flex_attention(qf, kf, vf, **kwargs, return_aux=AuxRequest(lse=True))
        lse = aux.lse
    else:
        out, lse = flex_attention(qf, kf, vf, **kwargs, return_lse=True)
    out = out[0].transpose(0, 1)
    if spec.sinks is not None:
        lse = lse[0].transpose(0, 1).unsqueeze(-1).to(torch.float32)
        out = (out * torch.sigmoid(lse - spec.sinks.to(torch.float32).view(1, -1, 1))).to(q.dtype)
    return out


register_backend(
    Backend(
        name="flex",
        fn=flex_varlen_attention,
        features=_features,
        availability=_availability,
        description="FlexAttention with a document-causal BlockMask (fast under torch.compile)",
    )
)
