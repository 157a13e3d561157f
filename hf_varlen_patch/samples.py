"""Samples for vision-language twins, laid out as their processors lay them out.

Test data, not runtime: tests, ``check`` and ``scan`` build processor-like inputs (image or video
placeholders, grids, token types) for tiny random twins, one sample per layout. A registry entry
names its builder in :class:`~hf_varlen_patch.registry.MultimodalSpec`.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection

import torch

__all__ = ["multimodal_sample", "inputs_on_model"]


def inputs_on_model(model: torch.nn.Module, inputs: dict) -> dict:
    """Tensors on the model's device, floating ones (pixels) in its dtype."""
    param = next(model.parameters())
    return {
        k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
        if isinstance(v, torch.Tensor)
        else v
        for k, v in inputs.items()
    }


def _vision_inputs(model, kind: str, generator: torch.Generator, mrope: Collection[str]) -> dict:
    """One image's (or video's) vision inputs for a tiny twin, shaped as its processor gives them."""
    config = model.config
    vision = config.vision_config
    model_type = config.model_type

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    if model_type in mrope:
        p, tp, c = vision.patch_size, vision.temporal_patch_size, vision.in_channels
        t, h, w = (2, 4, 4) if kind == "video" else (1, 4 + 4 * int(torch.randint(2, (1,), generator=generator)), 8)
        prefix = "pixel_values_videos" if kind == "video" else "pixel_values"
        grid = "video_grid_thw" if kind == "video" else "image_grid_thw"
        return {prefix: randn(t * h * w, c * tp * p * p), grid: torch.tensor([[t, h, w]])}
    if kind == "video":
        raise ValueError(f"{model_type} twins take no videos")
    size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    channels = getattr(vision, "num_channels", 3)
    if model_type in ("idefics3", "smolvlm"):
        return {"pixel_values": randn(1, 1, channels, size, size)}
    if model_type == "mistral3":
        return {"pixel_values": randn(1, channels, 56, 56), "image_sizes": torch.tensor([[56, 56]])}
    if model_type == "llava_next":
        return {"pixel_values": randn(1, 2, channels, size, size), "image_sizes": torch.tensor([[size, size]])}
    return {"pixel_values": randn(1, channels, size, size)}


def _features(output) -> list[torch.Tensor]:
    output = getattr(output, "pooler_output", output)
    if isinstance(output, torch.Tensor):
        return [output.reshape(-1, output.shape[-1])]
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], (list, tuple)):
        output = output[0]  # (features, deepstack features)
    return [f.reshape(-1, f.shape[-1]) for f in output]


def _placeholders(model, kind: str, inputs: dict) -> int:
    """How many placeholder tokens these vision inputs fill: the model's own feature count."""
    base = model.base_model
    inputs = inputs_on_model(model, inputs)  # the sample stays on the host; the count runs where the model is
    with torch.no_grad():
        if kind == "video":
            out = base.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        else:
            extra = {k: v for k, v in inputs.items() if k != "pixel_values"}
            if "image_grid_thw" in extra:
                out = base.get_image_features(inputs["pixel_values"], extra["image_grid_thw"])
            else:
                out = base.get_image_features(inputs["pixel_values"], **extra)
    return sum(f.shape[0] for f in _features(out))


def _token(config, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise AttributeError(f"{config.model_type} config has none of {names}")


def multimodal_sample(
    model,
    parts: list,
    generator: torch.Generator,
    *,
    mrope: Collection[str] = (),
    videos_in_image_tokens: Collection[str] = (),
) -> dict:
    """Processor-like inputs of one sample for a tiny twin: ``parts`` is a list of text lengths
    (ints) and ``"image"`` / ``"video"``, in order. ``mrope``: the types whose processors lay
    images out for (temporal, height, width) rotary positions (grids, start/end tokens);
    ``videos_in_image_tokens``: those that place video frames on image tokens (between their video
    start/end tokens). A registry entry's :class:`~hf_varlen_patch.registry.MultimodalSpec` says both."""
    config = model.config
    image_token = _token(config, "image_token_id", "image_token_index")
    special = {v for k, v in config.to_dict().items() if k.endswith(("token_id", "token_index")) and isinstance(v, int)}
    vocab = config.get_text_config().vocab_size
    text_ids = torch.tensor([i for i in range(1, vocab) if i not in special])
    rotary = config.model_type in mrope
    ids, types, vision = [], [], {}
    for part in parts:
        if isinstance(part, int):
            ids += text_ids[torch.randint(len(text_ids), (part,), generator=generator)].tolist()
            types += [0] * part
            continue
        inputs = _vision_inputs(model, part, generator, mrope)
        count = _placeholders(model, part, inputs)
        video = part == "video" and config.model_type not in videos_in_image_tokens
        token = _token(config, "video_token_id") if video else image_token
        # Qwen3-VL/3.5 and GLM-4V lay a video out frame by frame, each between its own start/end tokens
        per_frame = part == "video" and config.model_type.startswith(("qwen3", "glm4v"))
        frames = int(inputs["video_grid_thw"][0, 0]) if per_frame else 1
        for _ in range(frames):
            block = [token] * (count // frames)
            if rotary:
                kind = "video" if part == "video" else "image"
                start = _token(config, "vision_start_token_id", f"{kind}_start_token_id")
                end = _token(config, "vision_end_token_id", f"{kind}_end_token_id")
                block = [start, *block, end]
            ids += block
            types += [0 if t != token else (2 if part == "video" else 1) for t in block]
        for key, value in inputs.items():
            vision[key] = torch.cat([vision[key], value]) if key in vision else value
    sample = {"input_ids": torch.tensor([ids])}
    if "mm_token_type_ids" in inspect.signature(model.base_model.forward).parameters:
        sample["mm_token_type_ids"] = torch.tensor([types])
    if config.model_type == "gemma3":  # its processor marks image tokens 1
        sample["token_type_ids"] = torch.tensor([[int(t == 1) for t in types]])
    if config.model_type == "paligemma":  # prefix 0 (images and prompt), suffix 1: the last text part
        suffix = parts[-1] if isinstance(parts[-1], int) and len(parts) > 1 else 0
        sample["token_type_ids"] = torch.tensor([[0] * (len(ids) - suffix) + [1] * suffix])
    sample.update(vision)
    return sample
