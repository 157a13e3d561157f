"""RoBERTa-style decoders (``RobertaForCausalLM`` and kin): positions count from
``padding_idx + 1`` and skip padding tokens.

Alone, a sequence gets positions ``padding_idx + 1 + (number of non-pad tokens so far)`` (a pad
token gets ``padding_idx``), computed from ``input_ids``. In a packed forward the embeddings get
the same numbering restarted at every sequence start; attention goes through the
AttentionInterface.

Explicit ``position_ids`` next to ``input_ids`` never index the table: in unpacked calls too
(``generate()`` passes them), the tokens get the model's own numbering, as without them.
Upstream indexes the table with them raw, off by ``padding_idx + 1`` for the 0-based positions
collators emit; but an unpacked row of 0-based positions cannot be told from a packing
collator's row that holds one sequence, and that row must number as the sequence alone (and as
in a packed row), whatever else is in the batch. So this family's unpacked calls with
``position_ids`` differ from upstream's: an exception to "unpacked calls run upstream's code
unchanged" that ``tests/test_unpacked.py`` states exactly.

X-MOD adds per-language adapters chosen by ``lang_ids``, one language per row: the sequences
packed into a row share that row's language.
"""

from __future__ import annotations

import torch

from hf_varlen_patch.boundaries import Boundaries
from hf_varlen_patch.context import boundaries_for
from hf_varlen_patch.patching import call_as_kwargs
from hf_varlen_patch.registry import PatchEntry, register
from hf_varlen_patch.versions import TRANSFORMERS_4

from .bert_legacy import decoder_variants, refuse_relative_positions, wrap_self_attention


def roberta_positions(input_ids: torch.Tensor | None, boundaries: Boundaries, padding_idx: int) -> torch.Tensor:
    """Per-sequence RoBERTa positions for a packed (B, T) batch."""
    if input_ids is None:
        return boundaries.position_ids() + padding_idx + 1
    real = input_ids.ne(padding_idx).reshape(-1).long()
    counted = real.cumsum(0)
    before_start = (counted - real)[boundaries.sequence_starts()]
    within = counted - before_start[boundaries.seq_idx.long()]
    return (within * real + padding_idx).view(boundaries.shape)


def _packed_embeddings(wrapped, instance, args, kwargs):
    call = call_as_kwargs(wrapped, args, kwargs)
    boundaries = boundaries_for()
    if boundaries is not None:
        call["position_ids"] = roberta_positions(call.get("input_ids"), boundaries, instance.padding_idx)
        return wrapped(**call)
    if call.get("position_ids") is not None and call.get("input_ids") is not None:
        # 0-based positions, as packing collators emit them for a batch that happens to hold one
        # sequence per row: number the tokens as the model does by itself
        call["position_ids"] = None
        return wrapped(**call)
    return wrapped(*args, **kwargs)


def _patch(model, patcher, options) -> None:
    if TRANSFORMERS_4:  # 4.57: no **kwargs, BERT-style attention classes
        wrap_self_attention(model, patcher, options)
    for module in model.modules():
        if type(module).__name__.endswith("Embeddings") and hasattr(module, "padding_idx"):
            patcher.wrap_method(module, "forward", _packed_embeddings)


register(
    PatchEntry(
        family="roberta",
        model_types=(
            "roberta",
            "roberta-prelayernorm",
            "camembert",
            "data2vec-text",
            "xlm-roberta",
            "xlm-roberta-xl",
            "xmod",
        ),
        test_configs=decoder_variants,
        routes_attention=not TRANSFORMERS_4,
        patch=_patch,
        refuse=refuse_relative_positions,
        notes="positions from padding_idx + 1, skipping pad tokens, restarted per sequence; explicit "
        "position_ids, unpacked calls and generate() included, get that numbering (upstream indexes its table "
        "with them raw); attention via AttentionInterface",
    )
)
