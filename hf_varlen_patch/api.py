"""`apply` and `unapply`: the one-liners. They choose what patches a model (its registry entry,
or the generic route after a self-check), refuse what cannot be made exact, and leave the
patching itself to :mod:`hf_varlen_patch.install`."""

from __future__ import annotations

import logging
from typing import Any, TypeVar

import torch

from .backends import BACKENDS
from .errors import BackendUnavailableError, UnsupportedArchitectureError
from .heads import head_kind
from .install import STATE_ATTR, PatchState, _wrapper_chain, apply_entry, find_hf_model, is_patched, route_is_current
from .integrations import guard_prompt_learning, refuse_prompt_learning
from .loss import LOSSES
from .registry import PatchEntry, PatchOptions, lookup
from .sequence_parallel import SequenceParallel
from .versions import check_versions, is_tested, tested_range_text

__all__ = ["apply", "unapply", "is_patched", "find_hf_model", "apply_entry"]

logger = logging.getLogger("hf_varlen_patch")
M = TypeVar("M", bound=torch.nn.Module)


#: What ``apply`` does about self-checks (see :mod:`hf_varlen_patch.selfcheck`).
SELF_CHECK_MODES = ("auto", "always", "never")


def apply(
    model: M,
    backend: str = "auto",
    *,
    check_inputs: bool = True,
    self_check: str = "auto",
    loss: str = "token_mean",
    unpad: bool = False,
    sequence_parallel: Any = None,
) -> M:
    """Make ``model`` treat packed batches exactly like separate sequences; returns ``model``.

    Args:
        model: a transformers model (or a PEFT/DDP/compiled wrapper of one). Only this instance
            changes; other models of the same class, or built from the same config, do not.
        backend: ``"auto"`` (fastest that supports each layer), ``"flash_attn"``, ``"torch"``,
            ``"flex"`` or ``"sdpa"`` (the exact reference). A named backend that cannot serve a
            layer raises instead of falling back.
        check_inputs: validate collator-provided ``cu_seq_lens_*`` (one device sync per forward
            when they live on the GPU). ``False`` trusts them: zero syncs.
        self_check: for a model_type without a registry entry, ``"auto"`` checks packed ==
            separate on a tiny twin of this model's config (CPU, float32, about a second, cached)
            and patches through the generic route only if it passes; ``"always"`` runs that check
            for registered types too, ignoring the cache; ``"never"`` refuses unregistered types.
        loss: ``"token_mean"`` (the model's own loss: every target token weighs the same, as in a
            padded batch) or ``"sequence_mean"`` (the mean over sequences of each sequence's mean
            token loss, equal to averaging each unpacked sequence's loss; padded rows count as
            one sequence each). See :mod:`hf_varlen_patch.loss`.
        unpad: also run padded batches packed inside: a call whose ``attention_mask`` has padding
            and no cache to fill (no ``past_key_values``, ``use_cache`` not True) runs only its real
            tokens, each sequence numbered from 0 as if alone, and gets its outputs back in the
            padded layout (zeros at padding). See :mod:`hf_varlen_patch.unpad`.
        sequence_parallel: a ``torch.distributed`` process group (``True``: the default group), or
            a :class:`~hf_varlen_patch.SequenceParallel` (group and attention form), over which each
            packed stream is split: every rank runs its slice, from
            :func:`~hf_varlen_patch.shard_packed_batch`, and attention sees the whole stream
            (Ulysses: an all-to-all of heads before and after it; or gathered keys and values).
            See :mod:`hf_varlen_patch.sequence_parallel`.

    Packed means: some row of ``position_ids`` restarts (``pos[t] != pos[t-1] + 1``), or the
    forward gets ``cu_seq_lens_q/k`` (or, with ``unpad``, a padded ``attention_mask``). Anything
    else runs the upstream code unchanged.
    """
    check_versions()
    if backend != "auto" and backend not in BACKENDS:
        raise BackendUnavailableError(f"unknown backend {backend!r}; choose 'auto' or one of {sorted(BACKENDS)}.")
    if self_check not in SELF_CHECK_MODES:
        raise ValueError(f"self_check must be one of {SELF_CHECK_MODES}, not {self_check!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, not {loss!r}")
    if sequence_parallel is not None and unpad:
        raise ValueError(
            "unpad=True and sequence_parallel do not combine yet: shard packed batches (shard_packed_batch) instead "
            "of padded ones."
        )
    if sequence_parallel is not None:
        sequence_parallel = SequenceParallel.of(sequence_parallel)
    hf_model = find_hf_model(model)
    refuse_prompt_learning(_wrapper_chain(model)[:-1])
    guard_prompt_learning()
    options = PatchOptions(
        backend=backend, check_inputs=check_inputs, loss=loss, unpad=unpad, sequence_parallel=sequence_parallel
    )
    state: PatchState | None = vars(hf_model).get(STATE_ATTR)
    if state is not None:
        if state.options == options and route_is_current(hf_model):
            return model
        unapply(hf_model)

    model_type = getattr(hf_model.config, "model_type", None)
    if getattr(hf_model.config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"{type(hf_model).__name__} is an encoder-decoder model; hf_varlen_patch packs decoder-only models "
            f"(for {model_type}, its causal LM decoder class, e.g. AutoModelForCausalLM), not encoder-decoder ones."
        )
    entry = _entry_for(hf_model, model_type, self_check)
    reason = entry.refusal(hf_model.config)
    if reason:
        raise UnsupportedArchitectureError(f"hf_varlen_patch cannot patch this {model_type} model: {reason}")
    head_refusal = entry.refuse_heads.get(head_kind(hf_model))
    if head_refusal:
        raise UnsupportedArchitectureError(f"hf_varlen_patch cannot pack {type(hf_model).__name__}: {head_refusal}")
    _warn_untested(model_type)
    apply_entry(
        hf_model,
        entry,
        backend=backend,
        check_inputs=check_inputs,
        loss=loss,
        unpad=unpad,
        sequence_parallel=sequence_parallel,
        reapply=apply,
    )
    return model


def _entry_for(hf_model: torch.nn.Module, model_type: str, self_check: str) -> PatchEntry:
    """The registry entry, or (self-check permitting) the generic route vouched for by a twin."""
    from .registry import REGISTRY, _load_entries
    from .selfcheck import GENERIC_FAMILY
    from .selfcheck import self_check as run_self_check

    _load_entries()
    entry = REGISTRY.get(model_type)
    if entry is None and self_check == "never":
        return lookup(model_type)  # raises, listing what is supported
    if entry is not None and self_check != "always":
        return entry
    candidate = entry or PatchEntry(family=GENERIC_FAMILY, model_types=(model_type,))
    if candidate.refusal(hf_model.config):
        return candidate  # apply() raises with the entry's reason
    result = run_self_check(
        hf_model.config, entry=candidate, model_class=type(hf_model), use_cache=self_check != "always"
    )
    if not result.passed:
        what = f"the {entry.family} entry" if entry is not None else "no registry entry; the generic route"
        raise UnsupportedArchitectureError(
            f"hf_varlen_patch cannot patch this {model_type} model: {what} failed its self-check on a tiny "
            f"twin of this config: {result.reason}. Packing it unpatched may leak across sequences."
        )
    if entry is None:
        logger.warning(
            "hf_varlen_patch: %s has no registry entry; patched through the generic route after a self-check "
            "on a tiny twin of this config (packed == separate, max error %.1e).",
            model_type,
            result.error,
        )
    return candidate


_WARNED: set[str] = set()


def _warn_untested(model_type: str) -> None:
    """One line per model_type and process when transformers lies outside what CI tests."""
    import transformers

    if is_tested() or model_type in _WARNED:
        return
    _WARNED.add(model_type)
    logger.warning(
        "hf_varlen_patch: CI tests transformers %s, not %s; run `hf-varlen-patch check %s` to confirm "
        "packed == separate here.",
        tested_range_text(),
        transformers.__version__,
        model_type,
    )


def unapply(model: M) -> M:
    """Undo :func:`apply` on this instance exactly; a model that is not patched is returned as is."""
    hf_model = find_hf_model(model)
    state: PatchState | None = vars(hf_model).get(STATE_ATTR)
    if state is not None:
        state.patcher.undo()
    return model
