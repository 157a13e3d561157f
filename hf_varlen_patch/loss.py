"""Losses over packed batches: the token mean (what transformers computes) and an opt-in
per-sequence mean.

Packing leaves the token-mean loss unchanged: with each sequence's first label masked (which the
patched forward and the collators do) the packed row holds the same targets as the padded batch,
and Trainer's ``num_items_in_batch`` counts them. What packing does change is any loss that
averages *per sequence* (each sequence weighs the same, however long): over a packed row the model
only sees one long row. ``apply(model, loss="sequence_mean")`` restores it, equal to averaging
each unpacked sequence's own mean token loss, for packed and padded batches alike (a padded row
is one sequence).
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .boundaries import Boundaries
from .errors import UnsupportedArchitectureError

__all__ = ["LOSSES", "sequence_ids", "sequence_mean_loss", "token_losses"]

#: What ``apply(model, loss=...)`` accepts.
LOSSES = ("token_mean", "sequence_mean")


def sequence_ids(shape: tuple[int, int], boundaries: Boundaries | None, device: torch.device) -> torch.Tensor:
    """(B, T) int64: the sequence each token belongs to; without boundaries each row is one."""
    if boundaries is not None:
        return boundaries.seq_idx_rows().to(device=device, dtype=torch.int64)
    batch, length = shape
    return torch.arange(batch, device=device).view(batch, 1).expand(batch, length)


def token_losses(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, shift_labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) float32 cross-entropy of each position's target and whether it has one.

    Position t predicts ``labels[t + 1]`` (as transformers' causal-LM loss), or ``shift_labels[t]``
    when given; the last position has no target.
    """
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.to(logits.device)
    valid = targets != ignore_index
    losses = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, -2), targets.reshape(-1), ignore_index=ignore_index, reduction="none"
    ).view(targets.shape)
    return losses, valid


def sequence_mean_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    boundaries: Boundaries | None = None,
    *,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over sequences of each sequence's mean token loss (sequences without a target skipped).

    ``boundaries``: those of a packed batch (``hf_varlen_patch.Boundaries``, e.g.
    ``Boundaries.from_position_ids(position_ids)``); None: every row is one sequence (padded batch).
    Labels must already carry -100 at each sequence start (the patched forward and the collators
    put it there), so no target crosses a boundary. No device sync.
    """
    losses, valid = token_losses(logits, labels, ignore_index=ignore_index, shift_labels=shift_labels)
    ids = sequence_ids(tuple(losses.shape), boundaries, losses.device).reshape(-1)
    count = boundaries.num_sequences if boundaries is not None else losses.shape[0]
    sums = losses.new_zeros(count).index_add_(0, ids, losses.reshape(-1) * valid.reshape(-1))
    tokens = losses.new_zeros(count).index_add_(0, ids, valid.reshape(-1).to(losses.dtype))
    has_targets = tokens > 0
    per_sequence = torch.where(has_targets, sums / tokens.clamp(min=1), torch.zeros_like(sums))
    return per_sequence.sum() / has_targets.sum().clamp(min=1)


def sequence_mean_loss_function(current: Callable[[], Boundaries | None]) -> Callable[..., torch.Tensor]:
    """A drop-in for a model's ``loss_function`` (transformers' ``ForCausalLMLoss`` signature) that
    averages per sequence, reading the running packed forward's boundaries from ``current``.

    ``num_items_in_batch`` (a token count) is ignored: the normaliser is this batch's number of
    sequences. Trainer then averages the micro-batches of a gradient-accumulation step (``apply``
    sets ``accepts_loss_kwargs = False`` on the model), which is the mean over all sequences when
    each micro-batch holds as many sequences (Trainer's ``per_device_train_batch_size``).
    """

    def loss_function(
        logits: torch.Tensor,
        labels: torch.Tensor,
        vocab_size: int | None = None,
        num_items_in_batch: Any = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        return sequence_mean_loss(logits, labels, current(), ignore_index=ignore_index, shift_labels=shift_labels)

    return loss_function


def check_sequence_mean_supported(model: torch.nn.Module, shifts_labels: bool) -> None:
    """Refuse ``loss="sequence_mean"`` for a model whose loss the patch cannot replace."""
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):  # no source to read (built at run time): cannot vouch for it
        source = ""
    if not shifts_labels or "self.loss_function" not in source:
        raise UnsupportedArchitectureError(
            f"loss='sequence_mean' needs a causal LM that computes its loss through `self.loss_function`; "
            f"{type(model).__name__} computes it another way. Apply with the default loss='token_mean' and "
            "compute the loss from the logits with hf_varlen_patch.loss.sequence_mean_loss(logits, labels, "
            "boundaries)."
        )


def _trl_code(forward: Any) -> Any:
    """The code object of a TRL function among ``forward``'s wrappers (accelerate's autocast
    wrapper goes around TRL's; ``functools.wraps`` leaves ``__wrapped__``), else None."""
    seen = 0
    while forward is not None and seen < 8:
        function = getattr(forward, "__func__", forward)
        code = getattr(function, "__code__", None)
        if code is not None and "trl" in Path(code.co_filename).parts:
            return code
        forward, seen = getattr(function, "__wrapped__", None), seen + 1
    return None


_IN_MODEL_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar("hf_varlen_in_model_forward", default=False)


def refuse_bypassed_loss(patcher: Any, model: torch.nn.Module) -> None:
    """In ``loss="sequence_mean"`` mode, make the base model raise when it is called by a forward
    that replaced the model's own and computes the loss itself (TRL's fused LM head): that loss is
    a token mean, and keeping it silently would break the promise. Call after the entry wrappers,
    so these wrappers are the outermost."""
    base = model.base_model
    if base is model:
        return

    def mark(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        token = _IN_MODEL_FORWARD.set(True)
        try:
            return wrapped(*args, **kwargs)
        finally:
            _IN_MODEL_FORWARD.reset(token)

    def check(wrapped: Callable, instance: Any, args: tuple, kwargs: dict) -> Any:
        code = None if _IN_MODEL_FORWARD.get() else _trl_code(vars(model).get("forward"))
        if code is not None:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__}.forward was replaced by {code.co_name} ({code.co_filename}), which "
                "computes its own token-mean loss, so loss='sequence_mean' would not apply; apply with the default "
                "loss='token_mean' under TRL, or train with transformers' Trainer."
            )
        return wrapped(*args, **kwargs)

    patcher.wrap_method(model, "forward", mark)
    patcher.wrap_method(base, "forward", check)
