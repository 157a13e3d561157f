"""The model_type -> patch table. Entries live in ``hf_varlen_patch.patches``, one module per
architecture family; the engine knows nothing about any particular architecture."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import twins
from .errors import UnsupportedArchitectureError
from .versions import transformers_version

__all__ = [
    "PatchEntry",
    "PatchOptions",
    "MultimodalSpec",
    "ReleaseRefusal",
    "register",
    "register_twin_overrides",
    "lookup",
    "supported_model_types",
    "REGISTRY",
]

#: A twin override: config values, or ``original_config -> values`` (see :mod:`hf_varlen_patch.twins`).
TwinOverrides = dict[str, Any] | Callable[[Any], dict[str, Any]]


@dataclass(frozen=True)
class PatchOptions:
    """What the user asked `apply` for."""

    backend: str = "auto"
    check_inputs: bool = True
    loss: str = "token_mean"
    unpad: bool = False
    #: the process group a packed stream is split over (None: no sequence parallel)
    sequence_parallel: Any = None


@dataclass(frozen=True)
class MultimodalSpec:
    """How tests, ``check`` and ``scan`` lay out samples for a vision-language entry's tiny twins
    (the builder is :func:`hf_varlen_patch.samples.multimodal_sample`, which reads these)."""

    #: types whose processors lay images out for (temporal, height, width) rotary positions
    mrope: tuple[str, ...] = ()
    #: mRoPE types that place video frames on image tokens (they cannot mix videos with images)
    videos_in_image_tokens: tuple[str, ...] = ()
    #: types that pack text-only rows (a packed batch with images is refused)
    text_only: tuple[str, ...] = ()

    @property
    def videos_with_images(self) -> tuple[str, ...]:
        """Types whose samples may mix videos with images in one batch."""
        return tuple(t for t in self.mrope if t not in self.videos_in_image_tokens)


@dataclass(frozen=True)
class ReleaseRefusal:
    """``model_types`` cannot be made correct on the transformers releases in ``releases`` (a
    ``packaging`` specifier such as ``"<5"``); ``reason`` says what stands in the way there."""

    model_types: tuple[str, ...]
    reason: str
    releases: str = "<5"
    fix: str = "upgrade to transformers 5.x, where it is supported"

    def applies(self, model_type: str) -> bool:
        from packaging.specifiers import SpecifierSet

        version = transformers_version()
        return model_type in self.model_types and SpecifierSet(self.releases).contains(
            version.base_version, prereleases=True
        )

    def message(self) -> str:
        return f"on transformers {transformers_version()} {self.reason}; {self.fix}."


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
        routes_attention: the model's attention layers call transformers' AttentionInterface,
            so the engine routes them to its varlen function by name (a bool, or ``model -> bool``
            where the model's classes decide, e.g. legacy attention classes on 4.57). False: the
            entry's ``patch`` makes attention pack itself.
        patch: extra instance-level changes ``(model, patcher, options) -> None`` where the
            generic route is not enough (positions, ALiBi, attention classes, ...).
        refuse: ``config -> reason`` for configurations the entry cannot make correct (see
            :meth:`refusal`, which also applies ``refused_on``).
        refused_on: types this entry cannot make correct on some transformers releases, declared
            with the reason (:class:`ReleaseRefusal`).
        twin_overrides: model_type -> what generic shrinking gets wrong for its tiny twin (config
            values, or ``original_config -> values``), applied after the generic shrink.
        multimodal: for vision-language entries, how tests build samples (:class:`MultimodalSpec`).
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
    routes_attention: bool | Callable[[torch.nn.Module], bool] = True
    patch: Callable[[torch.nn.Module, Any, PatchOptions], None] | None = None
    refuse: Callable[[Any], str | None] | None = None
    shifts_labels: bool = True
    test_dtype: torch.dtype = torch.float32
    rows_are_sequences: Callable[[Any], bool] | None = None
    boundaries_from_context: bool | Callable[[torch.nn.Module], bool] = False
    attention_configs: Callable[[Any], list[Any]] | None = None
    notes: str = ""
    refuse_heads: dict[str, str] = field(default_factory=dict)
    refused_on: tuple[ReleaseRefusal, ...] = ()
    twin_overrides: dict[str, TwinOverrides] = field(default_factory=dict)
    multimodal: MultimodalSpec | None = None

    def refusal(self, config: Any) -> str | None:
        """Why this entry cannot make ``config``'s model correct here (None: it can)."""
        for refusal in self.refused_on:
            if refusal.applies(config.model_type):
                return refusal.message()
        return self.refuse(config) if self.refuse is not None else None

    def takes_generic_route(self, model: torch.nn.Module) -> bool:
        return self.routes_attention(model) if callable(self.routes_attention) else self.routes_attention

    def variants(self, model_type: str) -> dict[str, Any]:
        """{variant name: tiny config} to test ``model_type`` with."""
        if self.test_configs is not None:
            return self.test_configs(model_type)
        return {"twin": twins.tiny_config(model_type)}


REGISTRY: dict[str, PatchEntry] = {}
#: model_type -> twin override, from entries and from :func:`register_twin_overrides`.
TWIN_OVERRIDES: dict[str, TwinOverrides] = {}


def register(entry: PatchEntry) -> PatchEntry:
    for model_type in entry.model_types:
        REGISTRY[model_type] = entry
    TWIN_OVERRIDES.update(entry.twin_overrides)
    return entry


def register_twin_overrides(model_types: tuple[str, ...], overrides: TwinOverrides) -> None:
    """Twin overrides for model_types without an entry (an entry declares its own in
    ``PatchEntry.twin_overrides``)."""
    for model_type in model_types:
        TWIN_OVERRIDES[model_type] = overrides


def declared_twin_overrides(model_type: str) -> Callable[[Any], dict[str, Any]] | None:
    """``original_config -> values`` declared for ``model_type``'s twin, if any."""
    _load_entries()
    overrides = TWIN_OVERRIDES.get(model_type)
    if overrides is None or callable(overrides):
        return overrides
    return lambda _config, _o=overrides: dict(_o)


twins.declare_overrides_with(declared_twin_overrides)


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
