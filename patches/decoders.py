"""Text decoders for which the generic route is all packing needs.

Their attention goes through transformers' AttentionInterface with the kwargs passed down to
every layer, and their positions come from ``position_ids`` (rotary, learned or absolute tables
indexed by them, or none), so the registered attention function with the boundaries makes them
pack correctly. Each is tested on its tiny twin (``hf_varlen_patch.twins.tiny_config``) in CI
on both transformers lines; a type that exists on one line only is tested there.

Per-type refusals cover what the generic route cannot do on a given line (legacy attention
classes on 4.57) or configuration (length-dependent rotary scaling).
"""

from __future__ import annotations

from hf_varlen_patch.patching import attach_boundaries
from hf_varlen_patch.registry import PatchEntry, ReleaseRefusal, register

from ._rope import refuse_length_dependent_rope

#: Decoders whose AttentionInterface route is complete on every supported line.
DECODERS = (
    "afmoe",
    "apertus",
    "apertus1p5_text",
    "arcee",
    "aria_text",
    "axk1",
    "bitnet",
    "code_llama",
    "cohere",
    "cohere2",
    "cwm",
    "deepseek_v3",
    "emu3",
    "ernie4_5",
    "ernie4_5_moe",
    "exaone",
    "exaone4",
    "flex_olmo",
    "flint",
    "glm",
    "glm4",
    "glm4_moe",
    "glm4_moe_lite",
    "gpt-sw3",
    "granite",
    "granite_swa",
    "granitemoe_swa",
    "helium",
    "hy_v3",
    "hyperclovax",
    "internlm3",
    "iquestcoder",
    "jais2",
    "kolibri1",
    "minicpm3",
    "minimax_m2",
    "ministral3",
    "modernbert-decoder",
    "nanochat",
    "olmo",
    "olmo2",
    "olmo3",
    "phi",
    "qwen3_moe",
    "sarvam_mla",
    "sarvam_moe",
    "seed_oss",
    "smollm3",
    "solar_open",
    "vaultgemma",
    "youtu",
    "axk2",
    "beam",
    "cohere2_moe",
    "deepseek_v2",
    "deepseek_v32",
    "dots1",
    "dots3_note_text",
    "exaone_moe",
    "gemma4_unified_text",
    "glm_moe_dsa",
    "hunyuan_v1_dense",
    "hunyuan_v1_moe",
    "hy_v4",
    "laguna",
    "mellum",
    "mimo_v2_flash",
    "minimax_m3_vl_text",
    "ministral",
    "longcat_flash",
    "cohere_compass_text",
    "dory",
)

#: Decoders whose 4.57 code computes attention in legacy classes the generic route cannot reach.
NEEDS_5X = ("moshi", "phi4_multimodal")
#: What 4.57 gets in the way of, per type.
REFUSED_ON_4 = (
    ReleaseRefusal(
        ("emu3",),
        "its causal LM takes the composite (multimodal) config, which no tiny twin exercises",
    ),
    ReleaseRefusal(
        ("moshi",),
        "MoshiModel builds no causal mask without an attention_mask (eager attention sees the whole row), so "
        "a sequence alone has no reference result",
        fix="use transformers 5.x, where it is supported",
    ),
    ReleaseRefusal(
        ("phi4_multimodal",),
        "it computes attention in its own classes (or takes no **kwargs), which the generic route cannot reach",
    ),
)


#: Decoders whose layers call attention without the keyword arguments on some 5.x releases
#: (moshi on 5.17): the boundaries are attached to each self-attention module.
LAYERS_DROP_KWARGS = ("moshi",)


#: Sparse attention: an indexer picks the index_topk keys each query attends to (DeepSeek Sparse
#: Attention). The varlen kernels cannot take that selection, so a packed sequence longer than
#: index_topk would attend to keys upstream drops (shorter ones are exact: every causal key is selected).
SPARSE_ATTENTION = ("axk2", "deepseek_v32", "dots3_note_text", "glm_moe_dsa", "hy_v4")


def _refuse(config) -> str | None:
    if config.model_type in SPARSE_ATTENTION:
        return (
            "its sparse attention attends to the index_topk keys its indexer picks per query, a selection the "
            "varlen kernels cannot take: packed sequences longer than index_topk would attend to keys upstream "
            "drops. Run it unpacked (padded batches)."
        )
    return refuse_length_dependent_rope(config)


def _patch(model, patcher, options) -> None:
    if model.config.model_type not in LAYERS_DROP_KWARGS:
        return
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            attach_boundaries(patcher, module)


# the generic shrink gives glm4_moe_lite's MLA rows of 26 floats (kv_lora 16 + rope 10) and
# 40-wide query heads, views that fault on CUDA in upstream's own unpacked forward; the dims the
# other MLA twins have keep it aligned.
TWINS = {
    "glm4_moe_lite": {"qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32, "head_dim": 16},
}


register(
    PatchEntry(
        family="decoders",
        model_types=DECODERS + NEEDS_5X,
        patch=_patch,
        refuse=_refuse,
        refused_on=REFUSED_ON_4,
        twin_overrides=TWINS,
        notes="positions from position_ids; attention via AttentionInterface (tested on the tiny twin)",
    )
)
