"""Vision-language models (image-text-to-text) whose language model is a causal decoder.

The language model takes the generic route (its config only: the vision tower keeps upstream's
attention, and every image is encoded alone there, as upstream does). Each sample's images fill its
own placeholder tokens because a packed row keeps the samples, and their images, in order.

mRoPE models (the Qwen-VL family) get each sample's own rotary positions (``patches/_mrope.py``).

Bidirectional image or prefix attention (Gemma 3, PaliGemma) is transformers' ``block_sequence_ids``:
in a packed forward the boundaries carry the blocks upstream builds from ``token_type_ids``
(``Boundaries.blocks``). The language model's own registry entry (its patch and refusals) applies
inside the VLM too. Mllama's cross-attention sees the row's images: it packs text-only rows.
Refused with the reason: what upstream 4.57 gets wrong unpacked already, and Llama 4's VLM.

Under sequence parallel (``apply(model, sequence_parallel=...)``, one rank's slice of a packed
stream) the mRoPE family takes batches with images and videos: every rank runs the vision tower on
all of them (the sharder hands the vision inputs whole), and keeps the feature rows of its own
slice's placeholder tokens (those of the stream before its slice are skipped), so upstream's
``masked_scatter`` fills the slice's placeholders as it fills the whole row's; an image whose
placeholders straddle two ranks gives each its part. The rotary positions are the whole stream's
(``patches/_mrope.py``). Other vision-language types refuse images under sequence parallel.
"""

from __future__ import annotations

import sys
from contextvars import ContextVar
from typing import Any

import torch

from hf_varlen_patch.context import BOUNDARIES_KWARG, boundaries_for, enter_packed, leave_packed
from hf_varlen_patch.errors import MalformedBatchError, UnsupportedArchitectureError, VarlenPatchError
from hf_varlen_patch.patching import call_as_kwargs, nested_configs
from hf_varlen_patch.registry import MultimodalSpec, PatchEntry, ReleaseRefusal, register

from ._mrope import mrope_forward

#: Rotary positions over (temporal, height, width) from ``get_rope_index`` on the base model.
MROPE = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "glm4v")
#: Causal language models over text and image tokens alike, 1-D positions.
CAUSAL = ("llava", "llava_next", "mistral3", "idefics3", "smolvlm", "internvl")

#: Packed text-only batches are supported; a packed batch with images raises (the reason).
TEXT_ONLY = {
    "mllama": "its cross-attention layers attend from every text token to the row's images, so packed samples "
    "would see each other's images",
}


#: Bidirectional blocks over the text (transformers' ``block_sequence_ids``) from token_type_ids, as
#: upstream computes them: Gemma 3's images see themselves whole; PaliGemma's prefix (image and
#: prompt, type 0) sees itself whole, the suffix is causal. type -> (block ids from token_type_ids).
def _gemma3_blocks(model, token_type_ids: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor | None:
    if token_type_ids is None:
        return None  # upstream's mask is causal then, and so are Gemma 3's layers
    blocks_of = getattr(sys.modules[type(model).__module__], "get_block_sequence_ids_for_mask", None)
    if blocks_of is None:
        raise VarlenPatchError(
            f"{type(model).__name__} on this transformers release has no get_block_sequence_ids_for_mask, from "
            "which hf_varlen_patch takes Gemma 3's bidirectional image blocks; pack Gemma 3 on transformers 5.17-5.24."
        )
    return blocks_of(token_type_ids, device=token_type_ids.device)


def _prefix_blocks(model, token_type_ids: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
    # PaliGemma's layers are bidirectional (use_bidirectional_attention); only its mask makes the
    # suffix causal, and without token_type_ids upstream has no single answer
    if token_type_ids is None:
        raise VarlenPatchError(
            "packed PaliGemma batches need token_type_ids (0 for the image and prompt prefix, 1 for the suffix; "
            "its processor returns them): without them upstream attends causally under eager attention and "
            "bidirectionally under sdpa, so there is no one per-sample result to keep."
        )
    return torch.where(token_type_ids == 0, 0, -1)


BLOCKS = {"gemma3": _gemma3_blocks, "paligemma": _prefix_blocks}

REFUSED = {
    "llama4": "its vision-language model is not covered yet: Llama4ForConditionalGeneration wraps a whole "
    "Llama4ForCausalLM (no base model for the packed entry) and its default config gives no tiny twin; its text "
    "model llama4_text is covered",
}


def _language_configs(config: Any) -> list[Any]:
    """The language model's config (and its sub-configs): only it takes the generic route."""
    return nested_configs(config.get_text_config())


_NO_REFERENCE = "there is no correct per-sample result to match; upgrade to transformers 5.x"
_CUT_AT_IMAGES = (
    "upstream derives its attention mask from the temporal rotary row, so even an unpacked sample with an "
    "image is cut into pieces at its image tokens"
)
#: On transformers 4.57: what is wrong upstream, unpacked already, and what this entry cannot reach.
REFUSED_ON_4 = (
    ReleaseRefusal(("qwen3_vl", "qwen3_vl_moe"), _CUT_AT_IMAGES, fix=_NO_REFERENCE),
    ReleaseRefusal(
        ("glm4v",),
        "upstream hands its own (3, batch, seq_len) rotary positions to create_causal_mask, which crashes on "
        "every sample with an image, unpacked already",
        fix=_NO_REFERENCE,
    ),
    ReleaseRefusal(
        ("gemma3",),
        "Gemma3ForConditionalGeneration has no base model of its own (base_model_prefix is empty) and computes "
        "its loss from the attention mask, which a packed forward replaces",
        fix="upgrade to transformers 5.x",
    ),
    ReleaseRefusal(
        ("paligemma",),
        "PaliGemma builds its bidirectional prefix mask from token_type_ids in its own mask code, which "
        "hf_varlen_patch routes on 5.x only (block_sequence_ids)",
        fix="upgrade to transformers 5.x",
    ),
)


def _text_entry(config: Any) -> PatchEntry | None:
    """The registry entry of the language model's type (its quirks apply inside the VLM too)."""
    from hf_varlen_patch.registry import REGISTRY

    text = config.get_text_config()
    return REGISTRY.get(text.model_type) if text is not config else None


def _refuse(config: Any) -> str | None:
    reason = REFUSED.get(config.model_type)
    text_entry = _text_entry(config)
    if reason is None and text_entry is not None:
        text_reason = text_entry.refusal(config.get_text_config())
        if text_reason:
            reason = f"its language model ({config.get_text_config().model_type}): {text_reason.rstrip('.')}"
    return f"{reason}." if reason else None


#: Vision inputs of a forward (any of them makes a batch multimodal).
VISION_INPUTS = ("pixel_values", "pixel_values_videos", "cross_attention_states")


def _refuse_packed_images(reason: str):
    """A packed forward with vision inputs raises ``reason``; text-only packed rows run."""

    def forward(wrapped, instance, args, kwargs):
        if boundaries_for() is not None:
            call = call_as_kwargs(wrapped, args, kwargs)
            if any(call.get(name) is not None for name in VISION_INPUTS):
                raise VarlenPatchError(
                    f"hf_varlen_patch packs {instance.config.model_type} text-only batches, not batches with images: "
                    f"{reason}. Run samples with images unpacked (one per row, padded), or pack text-only samples."
                )
        return wrapped(*args, **kwargs)

    return forward


# ---------------------------------------------------------------- sequence parallel

#: The types whose images and videos run under sequence parallel (the feature rows of a rank's
#: placeholders cut from the whole stream's, rotary positions of the whole stream).
SEQUENCE_PARALLEL_IMAGES = MROPE

#: While a sharded forward of a vision-language model runs: modality -> (for each run of this
#: rank's tokens, the feature rows of the stream before it and in it; the stream's rows).
_FEATURE_ROWS: ContextVar[dict[str, tuple[tuple, int]] | None] = ContextVar("hf_varlen_feature_rows", default=None)


def _refuse_sharded_images(model_type: str, why: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"{model_type} under sequence parallel takes text-only packed batches, not batches with images or videos: "
        f"{why}. Run batches with images without sequence_parallel, or use a type whose images shard "
        f"({', '.join(SEQUENCE_PARALLEL_IMAGES)})."
    )


def _placeholder_rows(model, input_ids: torch.Tensor, shard, length: int) -> dict[str, tuple[tuple, int]]:
    """Per modality, for each run of this rank's tokens the placeholder tokens of the stream before
    it and in it, and the stream's total: the rows of the vision features that belong to the
    slice, as the model's own ``get_placeholder_mask`` places them."""
    from hf_varlen_patch.sequence_parallel import whole_stream_ids

    ids = whole_stream_ids(input_ids, shard)
    masks = model.get_placeholder_mask(ids, ids.new_zeros(*ids.shape, 1, dtype=torch.float32))
    rows = {}
    for modality, mask in zip(("image", "video"), masks):
        flat = mask.reshape(-1).to("cpu", torch.int64)
        # each run of this rank's tokens: (rows before it, rows in it)
        runs = tuple((int(flat[:start].sum()), int(flat[start:end].sum())) for start, end, *_ in shard.pieces)
        rows[modality] = (runs, int(flat.sum()))
    return rows


def _sharded_vision_forward(wrapped, instance, args, kwargs):
    """A base model's forward under sequence parallel with vision inputs: the features its
    ``get_image_features`` / ``get_video_features`` return are cut to the rows of this rank's
    placeholder tokens (``_cut_features``); refused for types that cannot (their reason)."""
    boundaries = boundaries_for()
    shard = getattr(boundaries, "shard", None)
    if shard is None:
        return wrapped(*args, **kwargs)
    call = call_as_kwargs(wrapped, args, kwargs)
    if not any(call.get(name) is not None for name in VISION_INPUTS):
        return wrapped(**call)
    model_type = instance.config.model_type
    if model_type not in SEQUENCE_PARALLEL_IMAGES:
        raise _refuse_sharded_images(
            model_type, "its image features have no sequence-parallel cut (which rows belong to which rank's slice)"
        )
    if call.get("mm_encoder_outputs") is not None or call.get("input_ids") is None:
        raise MalformedBatchError(
            f"{type(instance).__name__} under sequence parallel needs input_ids and pixel values (not "
            "inputs_embeds or precomputed mm_encoder_outputs): each rank finds the features of its slice's "
            "placeholder tokens from the whole stream's token ids."
        )
    token = _FEATURE_ROWS.set(_placeholder_rows(instance, call["input_ids"], shard, boundaries.shape[1]))
    try:
        return wrapped(**call)
    finally:
        _FEATURE_ROWS.reset(token)


def _feature_rows(features: Any, runs: tuple[tuple[int, int], ...], total: int, modality: str) -> Any:
    """Rows ``start:start + count`` of each run, of features given as one (N, D) tensor or per-image
    (n_i, D) tensors (returned as one tensor in a 1-tuple, which upstream's ``torch.cat`` takes as
    it is)."""
    if isinstance(features, torch.Tensor) and features.ndim == 2:
        rows = features
    elif isinstance(features, (tuple, list)) and all(isinstance(f, torch.Tensor) and f.ndim == 2 for f in features):
        rows = torch.cat(list(features), dim=0)
    else:
        raise UnsupportedArchitectureError(
            f"sequence parallel cannot cut this model's {modality} features ({type(features).__name__}) to a rank's "
            "placeholder tokens; run it without sequence_parallel."
        )
    if rows.shape[0] != total:
        raise MalformedBatchError(
            f"the packed stream has {total} {modality} placeholder tokens but its {modality}s give {rows.shape[0]} "
            "feature rows; give every sample's vision inputs with its tokens (pack_multimodal)."
        )
    cut = torch.cat([rows.narrow(0, start, count) for start, count in runs])
    return cut if isinstance(features, torch.Tensor) else (cut,)


def _cut_features(modality: str):
    """``get_image_features`` / ``get_video_features`` inside a sharded forward: the rows of this
    rank's placeholders (the pooled features, and Qwen3-VL's deepstack features alike)."""

    def wrapper(wrapped, instance, args, kwargs):
        rows = _FEATURE_ROWS.get()
        if rows is None:
            return wrapped(*args, **kwargs)
        token = _FEATURE_ROWS.set(None)  # Qwen3-VL's videos go through get_image_features: cut once
        try:
            out = wrapped(*args, **kwargs)
        finally:
            _FEATURE_ROWS.reset(token)
        where = rows[modality]
        if hasattr(out, "pooler_output"):  # a ModelOutput (5.x)
            out.pooler_output = _feature_rows(out.pooler_output, *where, modality)
            if getattr(out, "deepstack_features", None) is not None:
                out.deepstack_features = [_feature_rows(f, *where, modality) for f in out.deepstack_features]
            return out
        return _feature_rows(out, *where, modality)

    return wrapper


def _blocks_forward(blocks_of):
    """In a packed forward with ``token_type_ids``, the boundaries carry upstream's bidirectional
    blocks, so each sample's image (or prefix) attends both ways as it does alone."""

    def forward(wrapped, instance, args, kwargs):
        boundaries = boundaries_for()
        if boundaries is None:
            return wrapped(*args, **kwargs)
        call = call_as_kwargs(wrapped, args, kwargs)
        blocks = blocks_of(instance, call.get("token_type_ids"), boundaries.shape)
        if blocks is None:
            return wrapped(*args, **kwargs)
        if getattr(boundaries, "shard", None) is not None:
            if not bool((blocks >= 0).any()):
                return wrapped(*args, **kwargs)  # no bidirectional block: causal, as a text row
            raise UnsupportedArchitectureError(
                f"{type(instance).__name__}'s bidirectional blocks (images, or a prefix, that attend both ways) "
                "have no sequence-parallel path yet: a rank's slice would cut them. Run it without "
                "sequence_parallel; only rows without such blocks (Gemma 3's text-only rows) shard."
            )
        blocked = boundaries.with_blocks(blocks)
        if BOUNDARIES_KWARG in call:
            call[BOUNDARIES_KWARG] = blocked
        token = enter_packed(blocked)
        try:
            return wrapped(**call)
        finally:
            leave_packed(token)

    return forward


def _patch(model, patcher, options) -> None:
    text_entry = _text_entry(model.config)
    if text_entry is not None and text_entry.patch is not None:
        # the language model's own quirks (recurrent layers, chunked attention, ...)
        text_entry.patch(model, patcher, options)
    if model.config.model_type in MROPE:
        patcher.wrap_method(model.base_model, "forward", mrope_forward(options.check_inputs))
    if model.config.model_type in BLOCKS:
        patcher.wrap_method(model.base_model, "forward", _blocks_forward(BLOCKS[model.config.model_type]))
    if model.config.model_type in TEXT_ONLY:
        patcher.wrap_method(model.base_model, "forward", _refuse_packed_images(TEXT_ONLY[model.config.model_type]))
    if options.sequence_parallel is not None:
        if model.config.model_type in SEQUENCE_PARALLEL_IMAGES:
            for modality in ("image", "video"):
                if hasattr(model.base_model, f"get_{modality}_features"):
                    patcher.wrap_method(model.base_model, f"get_{modality}_features", _cut_features(modality))
        patcher.wrap_method(model.base_model, "forward", _sharded_vision_forward)


# ---------------------------------------------------------------- tiny twins and samples


#: Twins' mRoPE sections (temporal, height, width) over half the 16-dim heads. The default configs
#: leave them out (the models then assume a 128-dim head); released checkpoints set them.
MROPE_SECTIONS = {"qwen3_vl": [3, 3, 2], "qwen3_vl_moe": [3, 3, 2], "qwen3_5": [2, 1, 1], "qwen3_5_moe": [2, 1, 1]}
#: Qwen3.5 rotates a quarter of each head (partial_rotary_factor 0.25): 32-dim heads leave 8 rotary
#: dims, enough for every axis to get frequencies.
TEXT_HEAD_DIM = {"qwen3_5": 32, "qwen3_5_moe": 32}


def _mrope_twin(config) -> dict:
    section = MROPE_SECTIONS.get(config.model_type, [2, 3, 3])
    text = config.get_text_config()
    rope = dict(getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {})
    rope["mrope_section"] = section
    key = "rope_parameters" if hasattr(text, "rope_parameters") else "rope_scaling"
    if key == "rope_scaling":
        rope.setdefault("rope_type", "default")
        rope.setdefault("type", rope["rope_type"])
    vision = {"out_hidden_size": 64}
    if config.model_type == "qwen2_5_vl":
        # windows of 2x2 merged patches; the last of the two blocks attends over the whole image
        vision.update(fullatt_block_indexes=[1], window_size=56)
    if config.model_type in ("qwen3_vl", "qwen3_vl_moe"):
        vision.update(deepstack_visual_indexes=[0])
    if config.model_type == "qwen2_vl":
        vision = {"hidden_size": 64}
    text_overrides = {key: rope}
    if config.model_type in TEXT_HEAD_DIM:
        text_overrides["head_dim"] = TEXT_HEAD_DIM[config.model_type]
    return {"text_config": text_overrides, "vision_config": vision}


def _mllama_twin(config) -> dict:
    # the 4.57 default text config leaves rope_scaling None, which its rotary embedding indexes
    text = config.get_text_config()
    if hasattr(text, "rope_parameters") or getattr(text, "rope_scaling", None):
        return {}
    return {"text_config": {"rope_scaling": {"rope_type": "default"}}}


TWINS = {
    **{model_type: _mrope_twin for model_type in MROPE},
    "mllama": _mllama_twin,
    # images of 4x4 patches (16 tokens; internvl's pixel shuffle makes 4): the default sizes give hundreds
    "llava": {"vision_config": {"image_size": 56}},
    # one any-resolution grid the size of the base image: each image is the base view plus one tile
    "llava_next": {"vision_config": {"image_size": 56}, "image_grid_pinpoints": [[56, 56]]},
    "internvl": {"vision_config": {"image_size": [56, 56]}},
    "paligemma": {"vision_config": {"image_size": 56, "projection_dim": 64}, "projection_dim": 64},
    # 4x4 patches pooled to 2x2 image tokens (the default pools 64x64 patches to 16x16)
    "gemma3": {"vision_config": {"image_size": 56}, "mm_tokens_per_image": 4},
    "idefics3": {"vision_config": {"image_size": 64, "patch_size": 16}},
    "smolvlm": {"vision_config": {"image_size": 64, "patch_size": 16}},
}

#: GLM-4V places video frames on image tokens, so it cannot mix videos with images in one batch.
SPEC = MultimodalSpec(mrope=MROPE, videos_in_image_tokens=("glm4v",), text_only=tuple(TEXT_ONLY))


def _register(model_types: tuple[str, ...], **fields: Any) -> None:
    register(
        PatchEntry(
            family="multimodal",
            model_types=model_types,
            patch=_patch,
            refuse=_refuse,
            attention_configs=_language_configs,
            refused_on=REFUSED_ON_4,
            twin_overrides={t: TWINS[t] for t in model_types if t in TWINS},
            multimodal=SPEC,
            **fields,
        )
    )


_register(
    MROPE + CAUSAL + ("paligemma",) + tuple(TEXT_ONLY) + tuple(REFUSED),
    notes="language model via AttentionInterface (vision tower upstream); mRoPE positions per sample; "
    "bidirectional prefix blocks (paligemma); mllama text-only rows",
)
#: Gemma 3: its image projection's gradients reach 3e6 on the twin, where fp32 rounding alone
#: (2.6e-7 relative) exceeds the 1e-5 tolerance; packed == alone holds to float64 rounding.
_register(
    ("gemma3",),
    test_dtype=torch.float64,
    notes="bidirectional image blocks (token_type_ids) within each sample; tested in float64",
)
