"""Fused kernels that keep packed sequences apart, when installed: found once, used only on CUDA.

- causal_conv1d (Dao-AILab): ``causal_conv1d_fn(x, weight, bias, seq_idx=int32 (B, T))`` needs a
  channel-last (B, D, T) view, D a multiple of 8, width 2..4, and no initial states.
- flash-linear-attention's Triton short convolution: ``causal_conv1d(x (1, T, D), weight (D, W),
  bias, activation=, cu_seqlens=)``; used for packed short convolutions where causal_conv1d (a CUDA
  build) is not installed.
- mamba_ssm (Triton SSD): ``mamba_chunk_scan_combined`` / ``mamba_split_conv1d_scan_combined``
  reset at ``seq_idx`` changes. Its Mamba1 ``selective_scan_fn`` takes no boundaries: never used
  for packed inputs.
- flash-linear-attention: ``chunk_gated_delta_rule`` / ``chunk_kda`` take ``cu_seqlens`` with batch 1.

By default only kernels that ran for real against this project's bf16 GPU checks are used
(:data:`VERIFIED`); ``HF_VARLEN_RECURRENT_KERNELS=all`` also enables the others (written to their
documented signatures, not yet run on real hardware here), ``0`` turns all off: the exact torch
paths run instead.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections import Counter
from collections.abc import Callable

import torch

from ..memo import computed_once

__all__ = ["kernel", "kernels_enabled", "call_with_supported", "KERNEL_USAGE"]

#: How many packed recurrent calls each fused kernel served (for reports and GPU tests).
KERNEL_USAGE: Counter[str] = Counter()

#: name -> (module, attribute)
KERNELS = {
    "causal_conv1d": ("causal_conv1d", "causal_conv1d_fn"),
    "fla_causal_conv1d": ("fla.modules.causal_conv1d", "causal_conv1d"),
    "ssd_chunk_scan": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
    "ssd_split_conv1d_scan": ("mamba_ssm.ops.triton.ssd_combined", "mamba_split_conv1d_scan_combined"),
    "gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
    "kda": ("fla.ops.kda", "chunk_kda"),
}


#: Kernels checked on a real GPU (scripts/gpu_hybrid.sh): packed == separate within bf16 noise,
#: forward and gradients. ``auto`` takes only these; the others stay opt-in until they pass
#: (benchmarks/recurrent_kernels.md records the checks run so far).
VERIFIED: frozenset[str] = frozenset()


def kernels_enabled(name: str | None = None) -> bool:
    """Whether recurrent kernels (or the kernel ``name``) may run, per HF_VARLEN_RECURRENT_KERNELS."""
    setting = os.environ.get("HF_VARLEN_RECURRENT_KERNELS", "1")
    if setting in ("0", "false", "False"):
        return False
    return setting == "all" or name is None or name in VERIFIED


@computed_once
def _load(name: str) -> Callable | None:
    module, attr = KERNELS[name]
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception:  # not installed, or built for another torch/CUDA: the torch path runs
        return None


def kernel(name: str, *tensors: torch.Tensor) -> Callable | None:
    """The installed kernel ``name`` if every tensor is on CUDA and kernels are enabled, else None."""
    if not kernels_enabled(name) or not all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors):
        return None
    found = _load(name)
    if found is not None:
        KERNEL_USAGE[name] += 1
    return found


@computed_once
def _parameters(fn: Callable) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def call_with_supported(fn: Callable, *args, **kwargs):
    """Call ``fn`` with the keyword arguments its signature names (kernels reject unknown ones)."""
    names = _parameters(fn)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in names})
