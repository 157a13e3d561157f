"""The backend registry: one signature, one table, chosen by name (the built-in backends register
themselves here; :mod:`hf_varlen_patch.backends` loads them).

Every backend takes flattened tokens ``q (N, Hq, D)``, ``k, v (N, Hk, D)``, the forward's
:class:`~hf_varlen_patch.Boundaries` and an :class:`AttentionSpec` (what the layer needs), and
returns ``(N, Hq, Dv)``. A backend declares the features it supports; :func:`select_backend`
never hands a layer to a backend that lacks one of the layer's features.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..boundaries import Boundaries
from ..errors import BackendUnavailableError

__all__ = [
    "AttentionSpec",
    "Backend",
    "BACKENDS",
    "AUTO_ORDER",
    "register_backend",
    "select_backend",
    "available_backends",
]

logger = logging.getLogger("hf_varlen_patch")

#: Feature names a layer can need and a backend can declare.
FEATURES = (
    "causal",
    "bidirectional",
    "sliding_window",
    "softcap",
    "dropout",
    "sinks",
    "alibi",
    "gqa",
    "value_head_dim",  # values wider or narrower than queries/keys (multi-head latent attention)
    "bidirectional_blocks",  # Boundaries.blocks: blocks of tokens that see each other (images, prefixes)
)


@dataclass(frozen=True, eq=False)
class AttentionSpec:
    """What one attention call needs beyond q, k, v and the boundaries.

    ``window`` follows transformers' ``sliding_window``: a query sees itself and the
    ``window - 1`` tokens before it (flash's ``window_size=(window - 1, 0)``).
    ``sinks`` are per-head logits of a virtual key that absorbs probability mass (gpt-oss);
    ``alibi_slopes`` per-head slopes of a ``-slope * (i - j)`` bias inside each sequence.
    """

    causal: bool = True
    scale: float | None = None
    window: int | None = None
    softcap: float | None = None
    dropout: float = 0.0
    sinks: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None

    def features(
        self, num_q_heads: int, num_kv_heads: int, qk_head_dim: int | None = None, v_head_dim: int | None = None
    ) -> frozenset[str]:
        needed = {"causal" if self.causal else "bidirectional"}
        if qk_head_dim is not None and v_head_dim is not None and qk_head_dim != v_head_dim:
            needed.add("value_head_dim")
        if self.window is not None:
            needed.add("sliding_window")
        if self.softcap:
            needed.add("softcap")
        if self.dropout:
            needed.add("dropout")
        if self.sinks is not None:
            needed.add("sinks")
        if self.alibi_slopes is not None:
            needed.add("alibi")
        if num_q_heads != num_kv_heads:
            needed.add("gqa")
        return frozenset(needed)


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Boundaries, AttentionSpec], torch.Tensor]


@dataclass(frozen=True)
class Backend:
    """A named varlen attention kernel.

    ``availability(device, dtype)`` returns None when the backend can run, else the reason it
    cannot; ``features()`` what it supports on this installation (both can depend on what is
    importable, so they are functions, evaluated lazily).
    """

    name: str
    fn: AttentionFn
    features: Callable[[], frozenset[str]]
    availability: Callable[[torch.device, torch.dtype], str | None]
    description: str = ""


BACKENDS: dict[str, Backend] = {}

#: ``auto`` tries these in order; the first that can run and has every feature wins.
AUTO_ORDER: list[str] = ["flash_attn", "torch", "flex", "sdpa"]


def register_backend(backend: Backend) -> Backend:
    """Add (or replace) a backend in the registry; returns it."""
    BACKENDS[backend.name] = backend
    return backend


def available_backends(device: torch.device | str, dtype: torch.dtype) -> list[str]:
    """Names of the backends that can run on ``device`` with ``dtype`` here."""
    device = torch.device(device)
    return [n for n, b in BACKENDS.items() if b.availability(device, dtype) is None]


_logged: set[tuple] = set()


def _log_once(key: tuple, msg: str) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.warning(msg)


def select_backend(name: str, device: torch.device, dtype: torch.dtype, needed: frozenset[str]) -> Backend:
    """The backend that runs a layer: ``name`` itself, or for ``auto`` the first that fits.

    A backend named by the user that cannot run, or lacks a needed feature, raises
    :class:`BackendUnavailableError` (never a silent substitute). ``auto`` skips backends that
    lack a feature with a one-time log line naming what was skipped and why.
    """
    if name != "auto":
        backend = BACKENDS.get(name)
        if backend is None:
            raise BackendUnavailableError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)} or 'auto'.")
        reason = backend.availability(device, dtype)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {name!r} cannot run here: {reason}. Use backend='auto' or one of "
                f"{available_backends(device, dtype)}."
            )
        missing = needed - backend.features()
        if missing:
            fits = [n for n in available_backends(device, dtype) if not needed - BACKENDS[n].features()]
            raise BackendUnavailableError(
                f"backend {name!r} lacks {sorted(missing)}, which this layer needs; use "
                f"backend='auto' or one of {fits}."
            )
        return backend
    skipped = []
    for candidate in AUTO_ORDER:
        backend = BACKENDS.get(candidate)
        if backend is None or backend.availability(device, dtype) is not None:
            continue
        missing = needed - backend.features()
        if missing:
            skipped.append(f"{candidate} (lacks {', '.join(sorted(missing))})")
            continue
        if skipped:
            _log_once(
                (candidate, tuple(skipped)),
                f"hf_varlen_patch: backend 'auto' uses {candidate!r} for layers needing "
                f"{sorted(needed)}; skipped {'; '.join(skipped)}.",
            )
        return backend
    raise BackendUnavailableError(f"no backend can run attention needing {sorted(needed)} on {device} with {dtype}.")
