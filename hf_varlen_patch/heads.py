"""What a packed row means for each kind of head: one result per *sequence*.

The base model's output is per token and exact whatever the head. What the head does with it
decides what a packed row must mean:

- ``causal_lm`` (``*ForCausalLM``, ``*ForConditionalGeneration``): per-token logits; the loss
  shifts labels inside, so every sequence start gets label -100 (no term predicts across a
  boundary).
- ``token`` (token classification, masked LM): per-token logits; labels are taken as given.
- ``sequence_classification`` (reward models): each sequence's own last token is pooled (the
  rightmost token that is not ``pad_token_id``, as upstream pools a row), giving one score per
  real sequence, shape ``(num_sequences, num_labels)`` in packing order; ``labels`` hold one
  label per sequence. Segments that are only padding (``attention_mask`` 0, or every token
  ``pad_token_id``) get no score.
- ``question_answering``: per-token start/end logits; a span loss over a packed row would mix
  its sequences, so ``start_positions``/``end_positions`` are refused.
- ``base``: the hidden states, per token.

Any other head (multiple choice, pre-training, heads that pool a first token, ...) is refused in
packed calls with :class:`~hf_varlen_patch.errors.PackedCallError`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .boundaries import Boundaries
from .errors import PackedCallError

__all__ = ["HEAD_KINDS", "head_kind", "pool_sequences", "real_sequences", "captured_outputs"]

HEAD_KINDS = ("causal_lm", "token", "sequence_classification", "question_answering", "base", "other")

#: transformers' auto mappings -> head kind (the first that lists the class wins).
_MAPPINGS = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "causal_lm"),
    ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "causal_lm"),
    ("MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES", "causal_lm"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "sequence_classification"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "token"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "token"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "question_answering"),
    ("MODEL_MAPPING_NAMES", "base"),
)
#: Class-name endings for classes no mapping lists (user subclasses of none, remote code).
_SUFFIXES = (
    ("ForCausalLM", "causal_lm"),
    ("LMHeadModel", "causal_lm"),
    ("ForConditionalGeneration", "causal_lm"),
    ("ForSequenceClassification", "sequence_classification"),
    ("ForTokenClassification", "token"),
    ("ForMaskedLM", "token"),
    ("ForQuestionAnswering", "question_answering"),
)
_BY_NAME: dict[str, str] = {}


def _names_by_kind() -> dict[str, str]:
    if not _BY_NAME:
        from transformers.models.auto import modeling_auto

        for mapping, kind in _MAPPINGS:
            for value in getattr(modeling_auto, mapping, {}).values():
                for name in (value,) if isinstance(value, str) else value:
                    _BY_NAME.setdefault(name, kind)
    return _BY_NAME


def head_kind(model: torch.nn.Module) -> str:
    """The kind of head ``model`` (a transformers model) puts on its base model (:data:`HEAD_KINDS`)."""
    names = _names_by_kind()
    for cls in type(model).__mro__:
        if cls.__name__ in names:
            return names[cls.__name__]
    name = type(model).__name__
    for suffix, kind in _SUFFIXES:
        if name.endswith(suffix):
            return kind
    if getattr(model, "base_model", None) is model:
        return "base"
    return "other"


# ---------------------------------------------------------------- sequence classification


def captured_outputs(run: Callable[[], Any], modules: list[torch.nn.Module]) -> tuple[Any, list[torch.Tensor]]:
    """``run()``, and the tensors ``modules`` returned during it. The hooks live for this call only,
    so a head module swapped in after ``apply`` (PEFT's ``modules_to_save`` copy) is seen too."""
    outputs: list[torch.Tensor] = []

    def record(module: torch.nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            outputs.append(out)

    handles = [module.register_forward_hook(record) for module in modules]
    try:
        result = run()
    finally:
        for handle in handles:
            handle.remove()
    return result, outputs


def real_sequences(
    boundaries: Boundaries, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, pad_token_id: Any
) -> torch.Tensor:
    """(num_sequences,) bool: which sequences of the boundaries hold text, not padding.

    A padding segment is masked (``attention_mask`` 0 at its first token), or, without a mask,
    made of ``pad_token_id`` only (what a packing collator pads rows with)."""
    starts = boundaries.sequence_starts()
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        return attention_mask.reshape(-1).to(starts.device)[starts] != 0
    if pad_token_id is None or input_ids is None:
        return torch.ones(boundaries.num_sequences, dtype=torch.bool, device=starts.device)
    text = (input_ids.reshape(-1).to(starts.device) != pad_token_id).to(torch.int32)
    counts = torch.zeros(boundaries.num_sequences, dtype=torch.int32, device=starts.device)
    return counts.index_add_(0, boundaries.seq_idx.to(torch.int64), text) > 0


def last_tokens(boundaries: Boundaries, input_ids: torch.Tensor | None, pad_token_id: Any) -> torch.Tensor:
    """(num_sequences,) flat index of the token each sequence is pooled at, as upstream pools a
    row holding that sequence alone: its rightmost token that is not ``pad_token_id`` (its first
    token if all are), or its last token without a pad id (or with ``inputs_embeds``)."""
    cu = boundaries.cu_seqlens.to(torch.int64)
    if pad_token_id is None or input_ids is None:
        return cu[1:] - 1
    flat = torch.arange(boundaries.total_tokens, device=cu.device)
    seq = boundaries.seq_idx.to(torch.int64)
    keep = input_ids.reshape(-1).to(cu.device) != pad_token_id
    candidates = torch.where(keep, flat, cu[:-1][seq])
    return torch.zeros_like(cu[1:]).scatter_reduce(0, seq, candidates, reduce="amax", include_self=False)


def pool_sequences(
    per_token: torch.Tensor,
    boundaries: Boundaries,
    *,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    pad_token_id: Any,
) -> torch.Tensor:
    """(real sequences, ...) the per-token head output pooled at each real sequence's last token."""
    flat = per_token.reshape(boundaries.total_tokens, *per_token.shape[2:])
    index = last_tokens(boundaries, input_ids, pad_token_id)
    real = real_sequences(boundaries, input_ids, attention_mask, pad_token_id)
    return flat.index_select(0, index[real])


def per_token_scores(outputs: list[torch.Tensor], shape: tuple[int, int], num_labels: int, model: Any) -> torch.Tensor:
    """The last captured output that holds ``num_labels`` scores per token of the (B, T) call."""
    for out in reversed(outputs):
        if out.ndim == 3 and tuple(out.shape[:2]) == tuple(shape) and out.shape[-1] == num_labels:
            return out
    raise PackedCallError(
        f"{type(model).__name__} does not score every token (its head pools before scoring, e.g. a first-token "
        "pooler), so a packed row cannot give one score per sequence. Run it on padded batches (one sequence per "
        "row, no position_ids restarting), or unapply it."
    )


def check_sequence_labels(labels: torch.Tensor, count: int, model: Any) -> None:
    if labels.ndim == 0 or labels.shape[0] != count:
        raise PackedCallError(
            f"{type(model).__name__} on a packed batch gives one score per sequence ({count} real sequences), "
            f"but labels has shape {tuple(labels.shape)}; pass one label per sequence, in packing order "
            f"(shape ({count},), or ({count}, num_labels) for multi-label)."
        )
