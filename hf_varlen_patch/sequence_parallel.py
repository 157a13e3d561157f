"""Sequence parallel over the packed token stream (Ulysses): each rank holds one contiguous slice.

A packed batch is one stream of tokens. :func:`shard_packed_batch` pads the stream to a multiple
of the degree (with a trailing padding sequence, which no real token sees) and hands every rank
its slice of ``input_ids`` and ``position_ids``, the labels shifted over the *whole* stream
(``shift_labels``, so the last token of a slice predicts the first of the next), the global
number of targets (``num_items_in_batch``) and the global offsets (``cu_seq_lens_q/k``).

A model patched with ``apply(model, sequence_parallel=group)`` builds the global boundaries once
per forward from those offsets. Every token-wise layer runs on the local slice as it is. Before
attention, an all-to-all trades heads for tokens (each rank: all tokens, ``heads / degree`` of the
heads), the unchanged varlen backend runs with the global boundaries, and an all-to-all trades
them back. Grouped-query keys and values whose head count the degree does not divide are
repeated to the query heads; query heads the degree does not divide are padded with empty heads.
Per-head sinks and ALiBi slopes follow their heads.

Summing each rank's loss (each one divides by the global ``num_items_in_batch``) and summing each
rank's gradients (``all_reduce``) gives the single-process loss and gradients. A layer that reads
the per-sequence offsets of its own slice directly (recurrent scans, convolutions, attention
computed outside the varlen backends) would treat a slice of a sequence as a whole one: reading
them raises :class:`~hf_varlen_patch.errors.UnsupportedArchitectureError` instead. Recurrent ops
(short convolutions, scans, delta rules) run on the whole stream (:func:`on_whole_stream`): their
per-token inputs are all-gathered, every rank runs the op with the global boundaries and keeps
its slice of the output. Exact, at the cost of every rank computing those ops for every token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .boundaries import Boundaries
from .errors import MalformedBatchError, MalformedBoundariesError, UnsupportedArchitectureError

__all__ = [
    "SequenceParallel",
    "SequenceParallelCollator",
    "StreamTargets",
    "stream_targets",
    "with_stream_loss",
    "SequenceShard",
    "ShardedBoundaries",
    "on_whole_stream",
    "shard_packed_batch",
    "whole_stream_ids",
    "sharded_boundaries",
    "ulysses_attention",
    "gathered_kv_attention",
]

IGNORE_INDEX = -100
#: Per-token type ids of a vision-language batch: sliced like ``input_ids``.
TOKEN_TYPE_KEYS = ("mm_token_type_ids", "token_type_ids")
#: Vision inputs of a vision-language batch: handed whole to every rank.
VISION_INPUTS = ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw", "second_per_grid_ts")


ATTENTION_FORMS = ("auto", "ulysses", "all_gather_kv")


@dataclass(frozen=True)
class SequenceParallel:
    """How a patched model splits packed streams (``apply(model, sequence_parallel=...)``).

    ``group``: the ``torch.distributed`` process group whose ranks share a stream (None: the
    default group). ``attention``: ``"ulysses"`` (an all-to-all trades heads for tokens; each rank
    attends over the whole stream with heads / degree of the heads), ``"all_gather_kv"`` (each rank
    attends with its own queries, every head, over the keys and values gathered from the ranks
    before it, trimmed to the sequences its slice holds: any degree, no head split), or ``"auto"``:
    Ulysses where the degree divides the layer's query heads, all_gather_kv where it does not.
    """

    group: Any = None
    attention: str = "auto"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_FORMS:
            raise ValueError(f"SequenceParallel.attention must be one of {ATTENTION_FORMS}, not {self.attention!r}.")

    @classmethod
    def of(cls, value: Any) -> SequenceParallel:
        """``apply``'s ``sequence_parallel`` argument as a SequenceParallel: True (the default
        group), a process group, or a SequenceParallel; the group must exist."""
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "sequence_parallel splits packed streams over a torch.distributed process group, and "
                "torch.distributed is not initialised: call torch.distributed.init_process_group first."
            )
        found = cls() if value is True else value if isinstance(value, cls) else cls(group=value)
        group = dist.group.WORLD if found.group is None else found.group
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                f"sequence_parallel takes True, a torch.distributed ProcessGroup or "
                f"hf_varlen_patch.SequenceParallel(group=..., attention=...), not {type(found.group).__name__}."
            )
        return dataclasses.replace(found, group=group)


LAYOUTS = ("contiguous", "zigzag")
#: The sharded batch's key naming its layout (absent: contiguous); the patched model pops it.
LAYOUT_KEY = "sequence_parallel_layout"


def slice_pieces(layout: str, rank: int, world: int, total: int) -> tuple[tuple[int, int], ...]:
    """The runs ``(start, end)`` of stream tokens that ``rank`` holds, in its local order.

    ``contiguous``: one run of ``total / world`` tokens. ``zigzag``: the stream cut into
    ``2 * world`` chunks, rank r holding chunks r and ``2 * world - 1 - r``, so that every rank's
    queries see about as many earlier keys (causal attention over gathered keys is balanced)."""
    if layout == "contiguous":
        share = total // world
        return ((rank * share, (rank + 1) * share),)
    chunk = total // (2 * world)
    late = 2 * world - 1 - rank
    return ((rank * chunk, (rank + 1) * chunk), (late * chunk, (late + 1) * chunk))


@dataclass(frozen=True, eq=False)
class SequenceShard:
    """Where this rank's slice sits in the packed stream, and the stream's global boundaries.

    ``pieces``: the runs ``(start, end, key_start, key_end)`` of stream tokens this rank holds, in
    local order (one for the contiguous layout, two for zigzag); ``key_start`` is where the
    sequence holding the run's first token starts and ``key_end`` where the sequence holding its
    last token ends: the keys any of the run's queries may see (causal ones only up to ``end``).
    ``offset`` is the first run's start. Tensors gathered from the ranks come in rank order:
    :meth:`to_stream` puts them in stream order, :meth:`take_local` takes this rank's tokens back."""

    group: Any
    rank: int
    world: int
    offset: int
    whole: Boundaries
    attention: str = "auto"
    layout: str = "contiguous"
    pieces: tuple[tuple[int, int, int, int], ...] = ()

    @property
    def contiguous(self) -> bool:
        return self.layout == "contiguous"

    def _indices(self, rank: int, device: Any) -> torch.Tensor:
        runs = slice_pieces(self.layout, rank, self.world, self.whole.shape[1])
        return torch.cat([torch.arange(a, b, device=device) for a, b in runs])

    def indices(self, device: Any = None) -> torch.Tensor:
        """This rank's stream indices, in local order."""
        return self._indices(self.rank, device if device is not None else self.whole.device)

    def rank_order(self, device: Any) -> torch.Tensor:
        """The stream index of every token of a tensor gathered in rank order."""
        return torch.cat([self._indices(r, device) for r in range(self.world)])

    def to_stream(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """A tensor gathered in rank order along ``axis`` -> stream order."""
        if self.contiguous:
            return x
        return x.index_select(axis, torch.argsort(self.rank_order(x.device)))

    def to_ranks(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """A tensor in stream order along ``axis`` -> rank order (every rank's tokens together)."""
        if self.contiguous:
            return x
        return x.index_select(axis, self.rank_order(x.device))

    def take_local(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """This rank's tokens of a tensor in stream order along ``axis``."""
        axis = axis % x.ndim
        if self.contiguous:
            start, end, _, _ = self.pieces[0]
            return x.narrow(axis, start, end - start)
        return x.index_select(axis, self.indices(x.device))


def _refuse_slice_offsets(name: str) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"under sequence parallel a layer used this rank's own per-sequence offsets ({name}): a recurrent "
        "scan, a convolution, a bidirectional block or attention computed outside the varlen backends, which "
        "would see a slice of a sequence as a whole one. That layer has no sequence-parallel path yet: run this "
        "model without sequence_parallel."
    )


class _SliceOffsets:
    """Stands where a slice's own offsets would be: any use raises (reading it does not, so code
    that only walks a call's arguments, as FSDP2's hooks do, is not refused)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "name", name)

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise _refuse_slice_offsets(object.__getattribute__(self, "name"))

    def __getattr__(self, attr: str) -> Any:
        raise _refuse_slice_offsets(object.__getattribute__(self, "name"))

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        found = next((a for a in (*args, *(kwargs or {}).values()) if isinstance(a, cls)), None)
        raise _refuse_slice_offsets(found.name if found is not None else "offsets")

    __bool__ = __int__ = __index__ = __float__ = __len__ = __iter__ = __getitem__ = __array__ = _refuse
    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse  # type: ignore[assignment]
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __floordiv__ = __truediv__ = _refuse
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"<{object.__getattribute__(self, 'name')} of a sequence-parallel slice: not available>"


class ShardedBoundaries(Boundaries):
    """One rank's slice of a packed stream under sequence parallel.

    It has the slice's ``shape`` and ``is_packed``; attention reads the global offsets from
    ``shard.whole``. Its own per-sequence offsets would describe the slice's pieces of sequences as
    whole sequences, so they are not there: using ``cu_seqlens``, ``seq_idx``, ``max_seqlen`` or
    ``blocks`` raises. A layer that needs them has no sequence-parallel path yet, and is refused
    rather than run on a fragment.
    """

    @classmethod
    def of_slice(cls, shape: tuple[int, int], shard: SequenceShard) -> ShardedBoundaries:
        local = cls(
            cu_seqlens=_SliceOffsets("cu_seqlens"),  # type: ignore[arg-type]
            max_seqlen=_SliceOffsets("max_seqlen"),  # type: ignore[arg-type]
            seq_idx=_SliceOffsets("seq_idx"),  # type: ignore[arg-type]
            shape=shape,
            is_packed=True,
            blocks=_SliceOffsets("blocks"),  # type: ignore[arg-type]
        )
        object.__setattr__(local, "shard", shard)
        return local

    @property
    def device(self) -> torch.device:
        return self.shard.whole.device

    @property
    def position_bound(self) -> int:
        return self.shard.whole.shape[1]

    def __repr__(self) -> str:
        shard = self.shard
        where = " + ".join(f"tokens {a}..{b}" for a, b, _, _ in shard.pieces)
        return f"ShardedBoundaries(rank {shard.rank} of {shard.world}, {where} of {shard.whole.shape[1]})"

    def position_ids(self) -> torch.Tensor:
        return self.shard.take_local(self.shard.whole.position_ids().reshape(-1), 0).view(self.shape)


def _group_info(group: Any) -> tuple[int, int]:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise MalformedBatchError(
            "sequence parallel needs torch.distributed initialised (torch.distributed.init_process_group) before "
            "the batch is sharded or the model runs."
        )
    return dist.get_rank(group), dist.get_world_size(group)


def sharded_boundaries(call: Mapping[str, Any], parallel: SequenceParallel, *, check_inputs: bool) -> ShardedBoundaries:
    """This rank's boundaries for one forward: the call's tokens are its slice of the stream that
    ``cu_seq_lens_q`` (global offsets, from :func:`shard_packed_batch`) describes."""
    from .calls import batch_shape

    group = parallel.group
    rank, world = _group_info(group)
    shape = batch_shape(call)
    cu = call.get("cu_seq_lens_q")
    if cu is None:
        cu = call.get("cu_seq_lens_k")
    if shape is None or cu is None:
        raise MalformedBatchError(
            "a model patched with sequence_parallel takes its packed batches from "
            "hf_varlen_patch.shard_packed_batch (this rank's slice plus the stream's global cu_seq_lens_q/k); "
            "this call has no global offsets. Shard the packed batch with shard_packed_batch."
        )
    if shape[0] != 1:
        raise MalformedBatchError(f"a sequence-parallel slice is one row of the stream, not {shape[0]} rows.")
    length = shape[1]
    cu_host = cu.detach().to("cpu", torch.int64)
    total = int(cu_host[-1])
    if total != length * world:
        raise MalformedBoundariesError(
            f"the global offsets describe {total} tokens, but {world} ranks hold {length} tokens each "
            f"({length * world}); shard every rank's batch with shard_packed_batch, with the same degree."
        )
    max_len = call.get("max_length_q") or call.get("max_length_k")
    whole = Boundaries.from_cu_seqlens(cu.to(torch.int32), max_len, shape=(1, total), check=check_inputs)
    layout = call.get(LAYOUT_KEY) or "contiguous"
    if layout not in LAYOUTS or (layout == "zigzag" and total % (2 * world)):
        raise MalformedBatchError(
            f"a sequence-parallel slice in layout {layout!r} of {total} tokens over {world} ranks: shard the packed "
            f"batch with shard_packed_batch (layout one of {LAYOUTS})."
        )
    pieces = tuple(
        (start, end, int(cu_host[cu_host <= start].max()), int(cu_host[cu_host >= end].min()))
        for start, end in slice_pieces(layout, rank, world, total)
    )
    shard = SequenceShard(group=group, rank=rank, world=world, offset=pieces[0][0], whole=whole,
                          attention=parallel.attention, layout=layout, pieces=pieces)  # fmt: skip
    local = ShardedBoundaries.of_slice((1, length), shard)
    positions = call.get("position_ids")
    if check_inputs and isinstance(positions, torch.Tensor) and positions.ndim == 2:
        expected = local.position_ids()
        if not torch.equal(positions.to(expected.device, torch.int64), expected):
            raise MalformedBoundariesError(
                "this rank's position_ids do not match its slice of the global offsets (cu_seq_lens_q): shard "
                "every rank's batch with shard_packed_batch from the same packed batch."
            )
    return local


def shard_packed_batch(
    batch: Mapping[str, Any],
    *,
    group: Any = None,
    rank: int | None = None,
    world_size: int | None = None,
    pad_token_id: int = 0,
    layout: str = "contiguous",
) -> dict[str, Any]:
    """This rank's share of one packed batch, for a model patched with
    ``apply(model, sequence_parallel=group)``.

    The batch is ``input_ids`` (R, L) with ``position_ids`` restarting per sequence or
    ``cu_seq_lens_q`` (offsets over the R*L tokens), optional ``labels``; its R rows are read as
    one stream (as :class:`~hf_varlen_patch.packing.PackingCollator` or transformers'
    ``DataCollatorWithFlattening`` make them). The stream is padded to a multiple of the degree with
    a trailing padding sequence (``pad_token_id``, positions from 0, no targets). Returned: this
    rank's contiguous slice (1, T / degree) of ``input_ids`` and ``position_ids``;
    ``shift_labels`` (the next token of the same sequence, -100 at every sequence end and on
    padding) over the whole stream, sliced, with ``labels`` (the same slice: transformers computes
    a loss only when ``labels`` is given, and takes ``shift_labels`` as already shifted);
    ``num_items_in_batch`` (the global number of targets, so that the sum of the ranks' losses is
    the single-process loss); the global ``cu_seq_lens_q/k`` and ``max_length_q/k``. ``rank`` /
    ``world_size`` default to ``group``'s.

    ``layout="zigzag"`` (:func:`slice_pieces`) gives each rank two chunks of the stream instead of
    one run (the stream padded to a multiple of twice the degree), which balances causal attention
    over gathered keys (``SequenceParallel(attention="all_gather_kv")``) when sequences are long;
    the batch then says so (``sequence_parallel_layout``) and the patched model follows it.

    A vision-language batch (:func:`~hf_varlen_patch.packing.pack_multimodal`) shards too: its
    per-token type ids (``mm_token_type_ids``, ``token_type_ids``) are sliced like ``input_ids``
    (0, text, on the padding), and its vision inputs (:data:`VISION_INPUTS`: pixels and grids) go
    whole to every rank: each rank runs the vision tower on every image and keeps the features of
    its own slice's placeholder tokens (the patched model does; types that cannot are refused).
    """
    if layout not in LAYOUTS:
        raise MalformedBatchError(f"shard_packed_batch's layout must be one of {LAYOUTS}, not {layout!r}.")
    if rank is None or world_size is None:
        group_rank, group_world = _group_info(group)
        rank = group_rank if rank is None else rank
        world_size = group_world if world_size is None else world_size
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        raise MalformedBatchError(
            "shard_packed_batch takes a packed batch: input_ids of shape (rows, T) (pack with "
            "hf_varlen_patch.packing.PackingCollator or DataCollatorWithFlattening first)."
        )
    extra = set(batch) - {"input_ids", "position_ids", "labels", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                          "max_length_k", "attention_mask", "seq_idx", *TOKEN_TYPE_KEYS, *VISION_INPUTS}  # fmt: skip
    if extra:
        raise MalformedBatchError(
            f"shard_packed_batch does not know how to split {sorted(extra)}; give a text batch (input_ids, "
            "position_ids or cu_seq_lens_q, labels) or a vision-language batch from pack_multimodal with "
            f"{', '.join(TOKEN_TYPE_KEYS)} and {', '.join(VISION_INPUTS)} only."
        )
    mask = batch.get("attention_mask")
    if isinstance(mask, torch.Tensor) and not bool(mask.all()):
        raise MalformedBatchError(
            "shard_packed_batch got an attention_mask with padding: a packed batch marks its sequences by "
            "position_ids or cu_seq_lens_q, and padding is a sequence of its own (PackingCollator, "
            "DataCollatorWithFlattening); drop the mask or pack the batch first."
        )
    ids = ids.reshape(1, -1)  # the rows, one stream
    length = ids.shape[1]
    types = {}
    for key in TOKEN_TYPE_KEYS:
        value = batch.get(key)
        if value is None:
            continue
        if not isinstance(value, torch.Tensor) or value.numel() != length:
            raise MalformedBatchError(
                f"shard_packed_batch needs {key} as a tensor with one value per token of input_ids ({length}), "
                f"not {tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}."
            )
        types[key] = value.reshape(1, -1)
    if batch.get("cu_seq_lens_q") is not None:
        whole = Boundaries.from_cu_seqlens(batch["cu_seq_lens_q"], batch.get("max_length_q"), shape=(1, length))
    elif batch.get("position_ids") is not None:
        positions = batch["position_ids"]
        if positions.ndim != 2 or positions.numel() != length:
            raise MalformedBatchError(
                f"shard_packed_batch needs position_ids shaped like input_ids, not {tuple(positions.shape)} "
                "(for mRoPE models pass the 2-D positions restarting per sample, as pack_multimodal gives them: "
                "the patched model computes the rotary rows of the whole stream)."
            )
        whole = Boundaries.from_position_ids(positions.reshape(1, -1))
    else:
        raise MalformedBatchError("shard_packed_batch needs position_ids restarting per sequence, or cu_seq_lens_q.")
    cu = whole.cu_seqlens.to("cpu", torch.int64)
    labels = batch.get("labels")
    labels = ids if labels is None else labels.reshape(1, -1)
    # the next token's label, within its sequence (-100 where the sequence ends)
    shifted = torch.full_like(labels, IGNORE_INDEX)
    shifted[:, :-1] = labels[:, 1:]
    shifted[0, (cu[1:] - 1).to(labels.device)] = IGNORE_INDEX
    multiple = world_size * (2 if layout == "zigzag" else 1)
    padded = -(-length // multiple) * multiple
    pad = padded - length
    positions = whole.position_ids()
    if pad:
        ids = torch.cat([ids, ids.new_full((1, pad), pad_token_id)], dim=1)
        positions = torch.cat([positions, torch.arange(pad, device=positions.device)[None]], dim=1)
        shifted = torch.cat([shifted, shifted.new_full((1, pad), IGNORE_INDEX)], dim=1)
        cu = torch.cat([cu, torch.tensor([padded])])
        types = {key: torch.cat([value, value.new_zeros(1, pad)], dim=1) for key, value in types.items()}
    device = ids.device
    piece = torch.cat([torch.arange(a, b) for a, b in slice_pieces(layout, rank, world_size, padded)])

    def take(x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, piece.to(x.device))

    cu_dev = cu.to(device=device, dtype=torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    return {
        "input_ids": take(ids),
        "position_ids": take(positions),
        "labels": take(shifted),
        "shift_labels": take(shifted),
        "num_items_in_batch": int((shifted != IGNORE_INDEX).sum()),
        "cu_seq_lens_q": cu_dev,
        "cu_seq_lens_k": cu_dev,
        "max_length_q": max_len,
        "max_length_k": max_len,
        **{key: take(value) for key, value in types.items()},
        **{key: batch[key] for key in VISION_INPUTS if batch.get(key) is not None},
        **({LAYOUT_KEY: layout} if layout != "contiguous" else {}),
    }


class SequenceParallelCollator:
    """A data collator for sequence parallel under a data loader that gives every rank its own
    examples (HF ``Trainer``, accelerate, ``DistributedSampler``): the examples of every rank of
    ``group`` are gathered (in rank order), packed into one stream by ``collator`` and this rank's
    slice is returned (:func:`shard_packed_batch`). The group's ranks so train on one stream made
    of all their examples, and no example is dropped or seen twice.

    ``collator`` turns a list of examples into a packed batch (``input_ids``, ``position_ids`` or
    ``cu_seq_lens_q``, ``labels``; any number of rows, read as one stream); the default is
    transformers' ``DataCollatorWithFlattening`` (one row of every example). Under a ``Trainer``
    keep ``average_tokens_across_devices=True`` (its default): it then counts the targets of every
    rank's slice, sums them over the ranks and scales the loss for the gradient average, which
    gives exactly the loss and gradients of one process running the stream. The gather is a
    collective, so the collator must run in the training processes: ``dataloader_num_workers=0``.
    """

    def __init__(self, collator: Callable[[list], Mapping[str, Any]] | None = None, *, group: Any = None,
                 pad_token_id: int = 0, layout: str = "contiguous") -> None:  # fmt: skip
        if collator is None:
            from transformers import DataCollatorWithFlattening

            collator = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)
        self.collator, self.group, self.pad_token_id, self.layout = collator, group, pad_token_id, layout

    def __call__(self, examples: list) -> dict[str, Any]:
        import torch.distributed as dist

        if torch.utils.data.get_worker_info() is not None:
            raise MalformedBatchError(
                "SequenceParallelCollator gathers the examples of every rank, a collective that data loader "
                "worker processes cannot join: load data in the training process (dataloader_num_workers=0 / "
                "DataLoader(num_workers=0))."
            )
        rank, world = _group_info(self.group)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, list(examples), group=self.group)
        stream = [example for part in gathered for example in part]
        return shard_packed_batch(
            self.collator(stream),
            group=self.group,
            rank=rank,
            world_size=world,
            pad_token_id=self.pad_token_id,
            layout=self.layout,
        )


# ---------------------------------------------------------------- attention


def _all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Autograd-aware all-to-all of equal chunks along dim 0."""
    import torch.distributed.nn.functional as dist_fn

    x = x.contiguous()
    return dist_fn.all_to_all_single(torch.empty_like(x), x, group=group)


def _heads_for_ranks(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, H, ...) with H padded by empty heads to ``heads``."""
    if x.shape[1] == heads:
        return x
    pad = x.new_zeros(x.shape[0], heads - x.shape[1], *x.shape[2:])
    return torch.cat([x, pad], dim=1)


def _per_head(values: torch.Tensor | None, heads: int, rank: int, local: int) -> torch.Tensor | None:
    if values is None:
        return None
    if values.shape[0] < heads:
        values = torch.cat([values, values.new_zeros(heads - values.shape[0])])
    return values[rank * local : (rank + 1) * local]


def ulysses_attention(
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Boundaries, Any], torch.Tensor],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    shard: SequenceShard,
    spec: Any,
) -> torch.Tensor:
    """Attention of this rank's queries over the whole stream: q (1, Hq, L, D), k/v (1, Hk, L, D)
    of the local slice -> (1, L, Hq, Dv). ``attend(q, k, v, boundaries, spec)`` is the varlen
    attention on transformers' layout, run on (1, heads / degree, T, D) with the global boundaries."""
    world, rank, group = shard.world, shard.rank, shard.group
    q_heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads != q_heads and kv_heads % world:
        # too few key/value heads to split: repeat them to the query heads (grouped-query layout)
        key = key.repeat_interleave(q_heads // kv_heads, dim=1)
        value = value.repeat_interleave(q_heads // kv_heads, dim=1)
        kv_heads = q_heads
    q_total = -(-q_heads // world) * world
    kv_total = q_total if kv_heads == q_heads else kv_heads
    if q_total != q_heads and kv_heads != q_heads:
        # query heads the degree does not divide, keys grouped: give every query head its own keys
        key = key.repeat_interleave(q_heads // kv_heads, dim=1)
        value = value.repeat_interleave(q_heads // kv_heads, dim=1)
        kv_total = q_total
    query = _heads_for_ranks(query, q_total)
    key, value = _heads_for_ranks(key, kv_total), _heads_for_ranks(value, kv_total)
    length = query.shape[2]

    def scatter_heads(*tensors: torch.Tensor) -> list[torch.Tensor]:
        # each (1, H, L, D) -> chunks of H/P heads to each rank -> (1, H/P, P*L, D), tokens in rank
        # order; all in one all-to-all, so every rank's backward runs the same collectives in the
        # same order whatever else its graph holds
        chunks = [x.reshape(world, x.shape[1] // world, length, x.shape[3]) for x in tensors]
        sizes = [c[0].numel() for c in chunks]
        received = _all_to_all(torch.cat([c.reshape(world, -1) for c in chunks], dim=1), group)
        out = []
        for c, part in zip(chunks, received.split(sizes, dim=1)):
            part = part.reshape(world, *c.shape[1:])  # [j] = rank j's tokens of my heads
            whole = part.permute(1, 0, 2, 3).reshape(1, c.shape[1], world * length, c.shape[3])
            out.append(shard.to_stream(whole, 2))
        return out

    if not (query.dtype == key.dtype == value.dtype):
        raise UnsupportedArchitectureError("sequence parallel needs queries, keys and values of one dtype.")
    q, k, v = scatter_heads(query, key, value)
    local_heads = q_total // world
    spec = dataclasses.replace(
        spec,
        sinks=_per_head(spec.sinks, q_total, rank, local_heads),
        alibi_slopes=_per_head(spec.alibi_slopes, q_total, rank, local_heads),
    )
    out = shard.to_ranks(attend(q, k, v, shard.whole, spec), 1)  # (1, P*L, H/P, Dv)
    dim = out.shape[-1]
    pieces = out.reshape(world, length, local_heads, dim)  # [j] = rank j's tokens
    received = _all_to_all(pieces, group)  # [j] = my tokens of rank j's heads
    out = received.permute(1, 0, 2, 3).reshape(1, length, q_total, dim)
    return out[:, :, :q_heads].contiguous()  # callers .view() it


def uses_ulysses(shard: SequenceShard, query_heads: int) -> bool:
    """Whether a layer with ``query_heads`` runs Ulysses (else all_gather_kv) under ``shard``."""
    if shard.attention == "auto":
        return query_heads % shard.world == 0
    return shard.attention == "ulysses"


def gathered_kv_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, shard: SequenceShard, spec: Any
) -> torch.Tensor:
    """This rank's queries, every head, over the keys and values of the whole stream: q (1, Hq, L, D),
    k/v (1, Hk, L, D) of the local slice -> (1, L, Hq, Dv).

    Keys and values are all-gathered in one collective (its backward hands each rank the summed
    gradient of its own slice); each run of the rank's tokens (one, or two under the zigzag
    layout) attends over the keys of the sequences it holds (from ``key_start``; causal layers up
    to the run's last token, bidirectional ones up to ``key_end``), masked by the stream's
    sequence ids and token indices. The mask comes from the
    stream's global sequence ids and token indices (causal, windows), ALiBi from global distances;
    attention runs dense (:func:`~hf_varlen_patch.backends.reference.masked_attention`)."""
    from .backends.reference import masked_attention

    if not (query.dtype == key.dtype == value.dtype):
        raise UnsupportedArchitectureError("sequence parallel needs queries, keys and values of one dtype.")
    if query.dtype == torch.float32 and torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    key_dim = key.shape[-1]
    # keys and values of the whole stream, in stream order (one gather)
    both = shard.to_stream(_gather(torch.cat([key, value], dim=-1), shard, 2), 2)
    seq = shard.whole.seq_idx.to(query.device).reshape(-1)
    outs, local = [], 0
    for start, end, key_start, key_end in shard.pieces:  # each run of this rank's tokens
        queries = query[:, :, local : local + end - start]
        local += end - start
        if spec.causal:  # no key past the run's last query
            key_end = end
        keys = both[:, :, key_start:key_end]
        i = torch.arange(start, end, device=query.device)[:, None]
        j = torch.arange(key_start, key_end, device=query.device)[None, :]
        allowed = seq[i] == seq[j]
        if spec.causal:
            allowed = allowed & (j <= i)
        if spec.window is not None:
            allowed = allowed & (j > i - spec.window)
            if not spec.causal:
                allowed = allowed & (j < i + spec.window)
        distance = (i - j).abs() if spec.alibi_slopes is not None else None
        outs.append(
            masked_attention(queries, keys[..., :key_dim], keys[..., key_dim:], allowed[None, None], spec, distance)
        )
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()  # callers .view() it


# ---------------------------------------------------------------- recurrent ops


class _GatherTokens(torch.autograd.Function):
    """All-gather along a token axis; the backward sums every rank's gradient for this rank's
    slice. (torch.distributed.nn's all_gather hands gloo non-contiguous gradient slices, which it
    reads as if contiguous: wrong gradients off the first axis.)"""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any, axis: int) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group, ctx.axis = group, axis
        pieces = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return torch.cat(pieces, dim=axis)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        import torch.distributed as dist

        world = dist.get_world_size(ctx.group)
        chunks = [c.contiguous() for c in grad.chunk(world, dim=ctx.axis)]
        received = [torch.empty_like(chunks[0]) for _ in range(world)]
        dist.all_to_all(received, chunks, group=ctx.group)  # [j] = rank j's gradient for my slice
        return torch.stack(received).sum(dim=0), None, None


def _gather(x: torch.Tensor, shard: SequenceShard, axis: int) -> torch.Tensor:
    """The whole stream of ``x`` along its token ``axis`` (in rank order)."""
    return _GatherTokens.apply(x, shard.group, axis % x.ndim)


def whole_stream_ids(x: torch.Tensor, shard: SequenceShard) -> torch.Tensor:
    """The whole stream (1, T) of a per-token integer tensor (token ids, type ids) of which this
    rank holds its slice (1, T / degree): gathered from every rank, in stream order, without a
    gradient. Every rank of the group must call it at the same point of its forward."""
    import torch.distributed as dist

    piece = x.reshape(1, -1).contiguous()
    pieces = [torch.empty_like(piece) for _ in range(shard.world)]
    dist.all_gather(pieces, piece, group=shard.group)
    return shard.to_stream(torch.cat(pieces, dim=1), 1)


def on_whole_stream(
    op: Callable[[Boundaries, dict], Any],
    shard: SequenceShard,
    call: dict,
    token_axes: Mapping[str, int],
    out_axis: int,
) -> Any:
    """Run a recurrent ``op(boundaries, call)`` on the whole stream: the tensors named in
    ``token_axes`` (argument -> its token axis) gathered from every rank, the global boundaries,
    and this rank's slice of the output (the first element of a tuple; the rest, final states of
    the stream, as they come)."""
    given = {n: axis % call[n].ndim for n, axis in token_axes.items() if isinstance(call.get(n), torch.Tensor)}
    length = None
    # one gather per dtype for all of the op's inputs: every rank's backward then runs the same
    # collectives in the same order, whatever else its graph holds (MoE routing differs per rank)
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name in given:
        by_dtype.setdefault(call[name].dtype, []).append(name)
    for names in by_dtype.values():
        front = [call[n].movedim(given[n], 0) for n in names]
        length = front[0].shape[0]
        widths = [f[0].numel() for f in front]
        whole = shard.to_stream(_gather(torch.cat([f.reshape(length, -1) for f in front], dim=1), shard, 0), 0)
        for n, f, part in zip(names, front, whole.split(widths, dim=1)):
            call[n] = part.reshape(whole.shape[0], *f.shape[1:]).movedim(0, given[n])
    out = op(shard.whole, call)
    if length is None or out is None:
        return out
    if isinstance(out, tuple):
        return (shard.take_local(out[0], out_axis), *out[1:])
    return shard.take_local(out, out_axis)


# ---------------------------------------------------------------- the loss


@dataclass(frozen=True)
class StreamTargets:
    """This rank's next-token targets (shifted over the whole stream) and the stream's count."""

    shift_labels: torch.Tensor
    num_items: Any


def stream_targets(call: dict) -> StreamTargets | None:
    """Take the targets out of a causal LM's sharded call: the model then runs without labels and
    :func:`with_stream_loss` computes the loss, so no model's own loss plumbing (which may shift
    ``labels`` again, or divide by the slice's count) decides it."""
    labels = call.pop("labels", None)
    shift_labels = call.pop("shift_labels", None)
    num_items = call.pop("num_items_in_batch", None)
    if labels is None:
        return None
    return StreamTargets(shift_labels=shift_labels, num_items=num_items)


class _SumOverRanks(torch.autograd.Function):
    """The sum of every rank's value; each rank's gradient flows to its own share only (so that
    summing the ranks' gradients, as the engines do, counts each share once)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        import torch.distributed as dist

        total = x.detach().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def with_stream_loss(out: Any, targets: StreamTargets, shard: SequenceShard, *, whole_stream: bool = False) -> Any:
    """``out`` with this rank's share of the stream's mean next-token loss (as transformers'
    causal-LM loss computes it: float32 cross-entropy summed, divided by the global count). With
    ``whole_stream`` (a model in eval mode) every rank gets the whole stream's loss, for reports
    that average over ranks (Trainer's evaluation); its gradient is still this rank's share's."""
    import torch.nn.functional as F

    logits = out["logits"] if isinstance(out, Mapping) else out[0]
    labels = targets.shift_labels.to(logits.device)
    total = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = targets.num_items
    if count is None:
        count = (labels != IGNORE_INDEX).sum()
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    loss = total / count
    if whole_stream:
        loss = _SumOverRanks.apply(loss, shard.group)
    if isinstance(out, tuple):
        return (loss, *out)
    return type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})
