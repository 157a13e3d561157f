"""Typed errors: every refusal names the problem and the fix."""

from __future__ import annotations


class VarlenPatchError(Exception):
    """Base class of every error this library raises on purpose."""


class MalformedBoundariesError(VarlenPatchError, ValueError):
    """position_ids, cu_seq_lens or attention_mask cannot describe packed sequences."""


class MalformedBatchError(VarlenPatchError, ValueError):
    """Examples or samples given to the packers (``hf_varlen_patch.packing``) cannot be packed as they
    are: a wrong type, dtype, shape or value, or keys the samples disagree on."""


class UnsupportedArchitectureError(VarlenPatchError, NotImplementedError):
    """The model's architecture has no entry in the registry, or its entry refuses this config."""


class UnsupportedVersionError(VarlenPatchError, RuntimeError):
    """The installed transformers (or torch) is outside the supported range."""


class BackendUnavailableError(VarlenPatchError, RuntimeError):
    """A named backend cannot run here (not installed, wrong device or dtype) or lacks a feature."""


class BoundariesLostError(VarlenPatchError, RuntimeError):
    """A packed forward reached an attention layer without its boundaries: the patch is incomplete."""


class PackedCallError(VarlenPatchError, ValueError):
    """This call cannot run packed exactly (a head, an output or an argument that mixes the
    sequences of a row): the message says what to change."""


class PackedOutputAttentionsError(PackedCallError, NotImplementedError):
    """output_attentions=True in a packed forward: the varlen kernels build no attention matrix."""


class StalePatchError(VarlenPatchError, RuntimeError):
    """Something changed the patched model after ``apply`` (its attention implementation, say), so
    packed calls would no longer take the patched route; ``apply`` it again."""


class UnroutableCallError(VarlenPatchError, TypeError):
    """A routed upstream function's parameters cannot be read by name (a signature hidden behind
    ``*args``, a call that does not bind, or a parameter the boundary-aware op needs is gone)."""


class RouterBypassedError(VarlenPatchError, RuntimeError):
    """A packed forward ran a recurrent mixer whose convolution or scan the router never saw (a
    hub kernel replaced the function around it, or the mixer itself)."""
