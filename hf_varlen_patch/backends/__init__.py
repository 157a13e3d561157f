"""Variable-length attention backends: one signature, one registry, chosen by name.

Every backend takes flattened tokens ``q (N, Hq, D)``, ``k, v (N, Hk, D)``, the forward's
:class:`~hf_varlen_patch.Boundaries` and an :class:`AttentionSpec` (what the layer needs), and
returns ``(N, Hq, Dv)``. A backend declares the features it supports; :func:`select_backend`
never hands a layer to a backend that lacks one of the layer's features.
"""

from . import flash, flex, reference, torch_varlen  # noqa: F401  (each registers itself in base)
from .base import (
    AUTO_ORDER,
    BACKENDS,
    FEATURES,
    AttentionSpec,
    Backend,
    available_backends,
    register_backend,
    select_backend,
)

__all__ = [
    "AttentionSpec",
    "Backend",
    "BACKENDS",
    "AUTO_ORDER",
    "FEATURES",
    "register_backend",
    "select_backend",
    "available_backends",
]
