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

By default only kernels that passed this project's bf16 GPU check (scripts/gpu_kernel_check.py:
packed == each sequence alone within bf16's own noise, forward and gradients, 1 to 4000 tokens) are
used, and only on a stack at least as new as the one they passed on (:data:`VERIFIED`): an older
one runs the exact torch ops, with a warning naming what to upgrade.
``HF_VARLEN_RECURRENT_KERNELS=all`` also enables the others, on any stack; ``0`` turns all off.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from packaging.version import InvalidVersion, Version

from ..memo import computed_once

__all__ = [
    "kernel",
    "kernels_enabled",
    "call_with_supported",
    "KERNEL_USAGE",
    "VERIFIED",
    "VerifiedOn",
    "FROM_COMPILED",
]

logger = logging.getLogger("hf_varlen_patch")

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


@dataclass(frozen=True)
class VerifiedOn:
    """The stack a kernel passed the GPU check on: module -> the version it ran (the minimum taken
    by default; older releases may lack fixes the check relied on, e.g. Triton < 3.7.1 miscompiles
    fla's gated backward on Hopper), and where it ran."""

    versions: Mapping[str, str]
    device: str

    def missing(self) -> list[str]:
        """What this machine lacks of the stack: ``'triton 3.6.0 < 3.7.1'``-style entries."""
        lacking = []
        for module, least in self.versions.items():
            found = _version(module)
            if found is None or not _at_least(found, least):
                lacking.append(f"{module} {found or 'missing'} < {least}")
        return lacking


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # not installed, without a version, or a package import that fails (mamba_ssm's
        try:  # without its CUDA extension) while the Triton kernels it ships still import
            return importlib.metadata.version(module)
        except Exception:
            return None


def _at_least(found: str, least: str) -> bool:
    try:
        return Version(found).release >= Version(least).release
    except InvalidVersion:
        return False


_FLA = {"fla": "0.6.0", "triton": "3.7.1"}  # fla refuses its gated backward on Hopper below Triton 3.7.1
_MAMBA = {"mamba_ssm": "2.3.2", "triton": "3.7.1"}  # its Triton SSD ran there; older Tritons never did
_H100 = "H100 80GB HBM3, torch 2.11.0+cu130 (benchmarks/recurrent_kernels.md)"

#: Kernels that passed scripts/gpu_kernel_check.py on a real GPU, and the stack they passed on.
#: ``auto`` (HF_VARLEN_RECURRENT_KERNELS unset or 1) takes only these, where the stack is met; the
#: others stay opt-in (``all``) until they pass.
VERIFIED: Mapping[str, VerifiedOn] = {
    "gated_delta_rule": VerifiedOn(_FLA, _H100),
    "kda": VerifiedOn(_FLA, _H100),
    "fla_causal_conv1d": VerifiedOn(_FLA, _H100),
    "ssd_chunk_scan": VerifiedOn(_MAMBA, _H100),
}


@computed_once
def _verified_here(name: str) -> bool:
    """``name`` passed the check and this machine's stack is at least the one it passed on; an
    installed kernel skipped for its stack says so once."""
    if name not in VERIFIED:
        return False
    missing = VERIFIED[name].missing()
    if missing and _load(name) is not None:
        logger.warning(
            "hf_varlen_patch: the %s kernel is installed but passed the packed check only on a newer stack "
            "(%s); packed recurrent layers run the exact torch ops instead. Upgrade, or opt in with "
            "HF_VARLEN_RECURRENT_KERNELS=all.", name, "; ".join(missing),
        )  # fmt: skip
    return not missing


def kernels_enabled(name: str | None = None) -> bool:
    """Whether recurrent kernels (or the kernel ``name``) may run, per HF_VARLEN_RECURRENT_KERNELS."""
    setting = os.environ.get("HF_VARLEN_RECURRENT_KERNELS", "1")
    if setting in ("0", "false", "False"):
        return False
    return setting == "all" or name is None or _verified_here(name)


@computed_once
def _load(name: str) -> Callable | None:
    module, attr = KERNELS[name]
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception:  # not installed, or built for another torch/CUDA: the torch path runs
        return None


#: Kernels that compiled code calls, each run eagerly behind ``torch.compiler.disable`` (a graph
#: break each): the chunked scans, whose exact torch ops are a loop over chunks (fla marks its own
#: delta rules so already). The short convolutions are not among them: their torch op is one masked
#: depthwise convolution that inductor fuses into the graph.
FROM_COMPILED = frozenset({"gated_delta_rule", "kda", "ssd_chunk_scan"})


def _run_eagerly(name: str) -> Callable:
    @torch.compiler.disable
    def run(*args, **kwargs):
        KERNEL_USAGE[name] += 1
        return call_with_supported(_load(name), *args, **kwargs)

    run.__qualname__ = run.__name__ = f"{name}_outside_the_graph"
    return run


_OUTSIDE_THE_GRAPH = {name: _run_eagerly(name) for name in FROM_COMPILED}


def _on_cuda(tensors: tuple) -> bool:
    return all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)


def kernel(name: str, *tensors: torch.Tensor) -> Callable | None:
    """The installed kernel ``name`` if every tensor is on CUDA and kernels are enabled, else None.
    While compiling, only :data:`FROM_COMPILED` kernels, wrapped to run outside the graph."""
    if not _on_cuda(tensors):
        return None
    compiling = torch.compiler.is_compiling()
    if (compiling and name not in FROM_COMPILED) or not kernels_enabled(name) or _load(name) is None:
        return None
    if compiling:
        return _OUTSIDE_THE_GRAPH[name]
    KERNEL_USAGE[name] += 1
    return _load(name)


@computed_once
def _parameters(fn: Callable) -> frozenset[str] | None:
    """The keyword names ``fn`` takes; None where it takes any (``**kwargs``)."""
    parameters = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters)


def call_with_supported(fn: Callable, *args, **kwargs):
    """Call ``fn`` with the keyword arguments its signature names (kernels reject unknown ones)."""
    names = _parameters(fn)
    return fn(*args, **{k: v for k, v in kwargs.items() if names is None or k in names})
