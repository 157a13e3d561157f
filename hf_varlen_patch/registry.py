"""The model_type -> patch table. Entries live in ``hf_varlen_patch.patches``, one module per
architecture family; the engine knows nothing about any particular architecture."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import UnsupportedArchitectureError

__all__ = ["PatchEntry", "PatchOptions", "register", "lookup", "supported_model_types", "REGISTRY"]


@dataclass(frozen=True)
class PatchOptions:
    """What the user asked `apply` for."""

    backend: str = "auto"
    check_inputs: bool = True
    loss: str = "token_mean"


@dataclass(frozen=True)
class PatchEntry:
    """How to make one family of architectures pack correctly.

    Attributes:
        family: the module under ``patches/`` that declares it.
        model_types: the ``config.model_type`` values it covers. CI runs every one of them on the
            oldest and newest transformers it supports (``versions.TESTED_RANGE``).
        test_configs: model_type -> {variant name: tiny config} for tests and ``scan``; each
            variant exercises a code path (sliding window, softcap, ...). Default: the tiny twin
            of the model_type's default config (``{"twin": tiny_config(model_type)}``).
        generic: route attention through the registered AttentionInterface function (a bool,
            or ``model -> bool`` where it depends on the transformers version).
        patch: extra instance-level changes ``(model, patcher, options) -> None`` where the
            generic route is not enough (positions, ALiBi, attention classes, ...).
        refuse: ``config -> reason`` for configurations the entry cannot make correct.
        shifts_labels: the model shifts ``labels`` inside its loss (``labels[t]`` is the target of
            ``logits[t-1]``), so each sequence start is masked; False for models whose
            ``labels[t]`` is the target of ``logits[t]`` (``BartForCausalLM`` and kin): there
            each sequence's last label is masked instead.
        rows_are_sequences: ``config -> bool``: run multi-row batches with ``position_ids`` and an
            empty cache through the packed path even when no row restarts (one sequence per row),
            for models whose upstream lets one row change another (a batch-wide LongRoPE regime).
        boundaries_from_context: ``model -> bool`` (or a bool): the model drops keyword arguments
            on their way to attention (its forward or layers take no ``**kwargs``), so the engine
            passes no ``varlen_boundaries`` kwarg and no packed mask placeholder down; the entry's
            ``patch`` makes its attention modules read the boundaries with
            :func:`~hf_varlen_patch.patching.attach_boundaries` (and registers the layers around
            them with :func:`~hf_varlen_patch.patching.track_layer` for checkpointing).
        attention_configs: ``config -> configs`` whose attention the generic route takes (default:
            the config and every sub-config). A multimodal entry names its language model's, so
            the vision tower keeps upstream's attention.
        test_dtype: the dtype the equivalence tests and ``scan`` run the tiny models in (float32;
            float64 where fp32 rounding alone exceeds the 1e-5 tolerance, say so in ``notes``).
        refuse_heads: head kind (:data:`~hf_varlen_patch.heads.HEAD_KINDS`) -> why this family's
            head of that kind cannot give per-sequence results on a packed row (``apply`` refuses it).
        notes: one line for the README table.
    """

    family: str
    model_types: tuple[str, ...]
    test_configs: Callable[[str], dict[str, Any]] | None = None
    generic: bool | Callable[[torch.nn.Module], bool] = True
    patch: Callable[[torch.nn.Module, Any, PatchOptions], None] | None = None
    refuse: Callable[[Any], str | None] | None = None
    shifts_labels: bool = True
    test_dtype: torch.dtype = torch.float32
    rows_are_sequences: Callable[[Any], bool] | None = None
    boundaries_from_context: bool | Callable[[torch.nn.Module], bool] = False
    attention_configs: Callable[[Any], list[Any]] | None = None
    notes: str = ""
    refuse_heads: dict[str, str] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def variants(self, model_type: str) -> dict[str, Any]:
        """{variant name: tiny config} to test ``model_type`` with."""
        if self.test_configs is not None:
            return self.test_configs(model_type)
        from .twins import tiny_config

        return {"twin": tiny_config(model_type)}


REGISTRY: dict[str, PatchEntry] = {}


def register(entry: PatchEntry) -> PatchEntry:
    for model_type in entry.model_types:
        REGISTRY[model_type] = entry
    return entry


def _load_entries() -> None:
    from . import patches  # noqa: F401  (importing registers every family)


def supported_model_types() -> list[str]:
    _load_entries()
    return sorted(REGISTRY)


def lookup(model_type: str) -> PatchEntry:
    """The entry for ``model_type``, or a clear error listing what is supported."""
    _load_entries()
    entry = REGISTRY.get(model_type)
    if entry is None:
        raise UnsupportedArchitectureError(
            f"hf_varlen_patch has no patch for model_type {model_type!r}. Supported: "
            f"{', '.join(supported_model_types())}. To check a model anyway, run "
            "`hf-varlen-patch check <model_type>` or hf_varlen_patch.testing.compare_packed(); "
            "packing it unpatched may leak attention across sequences."
        )
    return entry
