"""Text decoders that `apply` refuses, each with the reason (what a dedicated patch would need).

Registering them turns the generic self-check's guess into a stated reason; the scan lists them
as REFUSED. Move a type out of here when a patch makes it exact.
"""

from __future__ import annotations

from hf_varlen_patch.registry import PatchEntry, register

OWN_ATTENTION = (
    "computes attention in its own classes, outside the AttentionInterface, so packed boundaries "
    "never reach it; it needs a dedicated patch"
)

PROPHETNET = "n-gram stream attention with relative position buckets over the row; not packable by the generic route"

REASONS = {
    "cpmant": OWN_ATTENTION + " (segment and relative-position buckets over the row)",
    "xlnet": "a permutation language model with relative attention over memories; packing has no meaning for it",
    "prophetnet": PROPHETNET,
    "xlm-prophetnet": PROPHETNET,
    "blt": "its entropy patcher groups bytes into patches over the whole row and its local encoder and decoder "
    "cross-attend between bytes and patches, so patches would straddle packed sequences; it needs a dedicated patch",
    "reformer": "LSH and chunked local attention bucket tokens over the whole row, and its axial position encodings "
    "need the row length to be the axial shape's product, so packed sequences cannot be kept apart",
    "gemma3n_text": "the trailing padding of a packed row becomes a sequence of pad tokens whose hidden states stay "
    "exactly zero, and its AltUp magnitude (mean(h**2) ** 0.5) back-propagates NaN into every gradient; it needs a "
    "dedicated patch",
    "mega": "its damped exponential moving average runs along the whole row (a recurrent state with no "
    "boundary-aware op here), and its attention is chunked over the row",
    "bigbird_pegasus": "its decoder still mixes packed sequences after per-sequence positions; it needs a "
    "dedicated patch",
    "hrm_text": "HrmTextForCausalLM fails upstream on the tiny twin (IndexError in its reasoning loop), so no "
    "equivalence can be shown",
    "doge": "dynamic mask attention adds a learned, input-dependent bias through the attention mask, which packed "
    "varlen attention does not take",
    "deepseek_v4": "its compressed-KV attention appends extra keys per query block; varlen kernels cannot express "
    "that layout yet",
}


register(
    PatchEntry(
        family="refused",
        model_types=tuple(REASONS),
        refuse=lambda config: REASONS[config.model_type],
        notes="refused: see the reason per type",
    )
)
