"""hf_varlen_patch: packed batches for transformers models, exactly as if each sequence ran alone.

import hf_varlen_patch
hf_varlen_patch.apply(model)              # backend="auto"
model(input_ids=packed_ids, position_ids=packed_positions, labels=packed_labels)
"""

from .api import apply, is_patched, unapply
from .backends import BACKENDS, AttentionSpec, register_backend, select_backend
from .boundaries import Boundaries
from .errors import (
    BackendUnavailableError,
    BoundariesLostError,
    MalformedBatchError,
    MalformedBoundariesError,
    PackedCallError,
    PackedOutputAttentionsError,
    RouterBypassedError,
    StalePatchError,
    UnroutableCallError,
    UnsupportedArchitectureError,
    UnsupportedVersionError,
    VarlenPatchError,
)
from .logprobs import token_logprobs
from .registry import PatchEntry, lookup, register, supported_model_types
from .sequence_parallel import SequenceParallel, SequenceParallelCollator, shard_packed_batch

__version__ = "0.1.0"

__all__ = [
    "apply",
    "unapply",
    "is_patched",
    "token_logprobs",
    "shard_packed_batch",
    "SequenceParallelCollator",
    "SequenceParallel",
    "Boundaries",
    "AttentionSpec",
    "BACKENDS",
    "register_backend",
    "select_backend",
    "PatchEntry",
    "register",
    "lookup",
    "supported_model_types",
    "VarlenPatchError",
    "MalformedBoundariesError",
    "MalformedBatchError",
    "PackedCallError",
    "PackedOutputAttentionsError",
    "StalePatchError",
    "UnroutableCallError",
    "RouterBypassedError",
    "UnsupportedArchitectureError",
    "UnsupportedVersionError",
    "BackendUnavailableError",
    "BoundariesLostError",
]
