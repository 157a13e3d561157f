"""Typed errors: every refusal names the problem and the fix."""

from __future__ import annotations


class VarlenPatchError(Exception):
    """Base class of every error this library raises on purpose."""


class MalformedBoundariesError(VarlenPatchError, ValueError):
    """position_ids, cu_seq_lens or attention_mask cannot describe packed sequences."""


class UnsupportedArchitectureError(VarlenPatchError, NotImplementedError):
    """The model's architecture has no entry in the registry, or its entry refuses this config."""


class UnsupportedVersionError(VarlenPatchError, RuntimeError):
    """The installed transformers (or torch) is outside the supported range."""


class BackendUnavailableError(VarlenPatchError, RuntimeError):
    """A named backend cannot run here (not installed, wrong device or dtype) or lacks a feature."""


class BoundariesLostError(VarlenPatchError, RuntimeError):
    """A packed forward reached an attention layer without its boundaries: the patch is incomplete."""
