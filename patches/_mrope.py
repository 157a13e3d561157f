"""mRoPE (the Qwen-VL family, GLM-4V): rotary (temporal, height, width) positions per sample.

Upstream computes them from the whole row (``get_rope_index``): packed, the second sample's
positions would go on from the first's. In a packed forward they are computed per sample, with the
model's own ``get_rope_index`` on the samples laid out as rows, and handed down in transformers'
packed layout ``(4, B, T)``: the text row (restarting per sample) before the three rotary rows.
Rotary rows the caller passes (``(3|4, B, T)``) are checked against that per-sample computation.

Under sequence parallel (one rank's slice of a packed stream) the positions are computed for the
whole stream (its token ids and type ids gathered from the ranks, the stream's global offsets),
and each rank keeps its slice: an image's rows restart where its sample starts, not where the
rank's slice does.
"""

from __future__ import annotations

import inspect

import torch

from hf_varlen_patch.context import boundaries_for
from hf_varlen_patch.errors import MalformedBoundariesError, VarlenPatchError
from hf_varlen_patch.patching import call_as_kwargs

__all__ = ["mrope_forward", "per_sample_rope_positions", "sharded_rope_positions"]


def _segments(boundaries) -> list[tuple[int, int]]:
    cu = boundaries.cu_seqlens.tolist()  # one sync; get_rope_index reads its inputs on the host anyway
    return list(zip(cu[:-1], cu[1:]))


def per_sample_rope_positions(model: torch.nn.Module, call: dict, boundaries) -> torch.Tensor | None:
    """(3, B, T) rotary positions, each sample's as if it ran alone; None where upstream would not
    compute mRoPE positions (no input ids, or, on 5.x, no ``mm_token_type_ids``): there each
    sample alone gets plain positions."""
    input_ids = call.get("input_ids")
    rope_index = model.get_rope_index
    params = inspect.signature(rope_index).parameters
    if input_ids is None or ("mm_token_type_ids" in params and call.get("mm_token_type_ids") is None):
        return None
    batch, length = boundaries.shape
    segments = _segments(boundaries)
    longest = max(e - s for s, e in segments)
    flat_ids = input_ids.reshape(-1)
    rows = flat_ids.new_zeros(len(segments), longest)
    mask = flat_ids.new_zeros(len(segments), longest)
    types = call.get("mm_token_type_ids")
    flat_types = types.reshape(-1) if types is not None else None
    type_rows = rows.clone() if types is not None else None
    for i, (s, e) in enumerate(segments):
        rows[i, : e - s] = flat_ids[s:e]
        mask[i, : e - s] = 1
        if type_rows is not None:
            type_rows[i, : e - s] = flat_types[s:e]
    given = dict(
        input_ids=rows,
        attention_mask=mask,
        image_grid_thw=call.get("image_grid_thw"),
        video_grid_thw=call.get("video_grid_thw"),
        second_per_grid_ts=call.get("second_per_grid_ts"),
        mm_token_type_ids=type_rows,
    )
    with torch.no_grad():
        positions, _ = rope_index(**{k: v for k, v in given.items() if k in params})
    flat = positions.new_zeros(3, batch * length)
    for i, (s, e) in enumerate(segments):
        flat[:, s:e] = positions[:, i, : e - s]
    return flat.view(3, batch, length)


def sharded_rope_positions(model: torch.nn.Module, call: dict, shard, length: int) -> torch.Tensor | None:
    """This rank's (3, 1, length) rotary positions under sequence parallel: each sample's own
    positions over the whole stream (token and type ids gathered from every rank, the global
    offsets), sliced where this rank's tokens sit."""
    from hf_varlen_patch.sequence_parallel import whole_stream_ids

    whole = dict(call)
    for key in ("input_ids", "mm_token_type_ids"):
        if isinstance(call.get(key), torch.Tensor):
            whole[key] = whole_stream_ids(call[key], shard)
    positions = per_sample_rope_positions(model, whole, shard.whole)
    return None if positions is None else shard.take_local(positions, -1)


def mrope_forward(check_inputs: bool):
    """The base model's forward in packed mode gets ``(4, B, T)`` positions: the text row of the
    boundaries, then each sample's own rotary rows (computed, or the caller's once checked)."""

    def forward(wrapped, instance, args, kwargs):
        boundaries = boundaries_for()
        if boundaries is None:
            return wrapped(*args, **kwargs)
        call = call_as_kwargs(wrapped, args, kwargs)
        given = call.get("position_ids")
        text = boundaries.position_ids()
        rotary = given[-3:] if isinstance(given, torch.Tensor) and given.ndim == 3 else None
        if rotary is None or check_inputs:
            shard = getattr(boundaries, "shard", None)
            if shard is None:
                expected = per_sample_rope_positions(instance, call, boundaries)
            else:
                expected = sharded_rope_positions(instance, call, shard, boundaries.shape[1])
            if expected is None:
                if call.get("image_grid_thw") is not None or call.get("video_grid_thw") is not None:
                    if rotary is None:
                        raise VarlenPatchError(
                            f"{type(instance).__name__} needs input_ids (and, on transformers 5.x, "
                            "mm_token_type_ids from the processor) to place each packed sample's images in "
                            "its rotary positions; pass them, or pass the (3, batch, seq_len) rotary "
                            "position_ids each sample gets alone."
                        )
                expected = text.unsqueeze(0).expand(3, -1, -1) if rotary is None else rotary
            if rotary is not None and not torch.equal(rotary.to(expected.device), expected):
                raise MalformedBoundariesError(
                    "the rotary (temporal, height, width) position_ids of this packed batch differ from what "
                    "each sample gets alone: they must restart per sample as get_rope_index computes them for "
                    "that sample on its own. Pass 2-D position_ids (restarting at 0 per sample) or "
                    "cu_seq_lens and the patched model computes them."
                )
            rotary = expected
        call["position_ids"] = torch.cat([text.unsqueeze(0).to(rotary.device), rotary.to(text.dtype)], dim=0)
        return wrapped(**call)

    return forward
