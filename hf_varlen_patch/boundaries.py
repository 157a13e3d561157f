"""Where the packed sequences start and end: one small immutable object per forward.

A packed batch is (B, T) tokens; every row holds several sequences back to back. All layers see
the tokens flattened to (B*T,), so a sequence is a [start, end) range of that flat index and
`cu_seqlens` is the usual varlen-kernel description (starts plus the total). Rows never merge:
every row start is a sequence start. Padding (attention_mask == 0) forms sequences of its own,
so it can never be attended to by real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .errors import MalformedBoundariesError

__all__ = ["Boundaries"]


@dataclass(frozen=True, eq=False)
class Boundaries:
    """Packed-sequence boundaries over the flattened (B*T,) tokens of one forward.

    Attributes:
        cu_seqlens: int32 (num_sequences + 1,) on the model's device; 0, ends..., B*T.
        max_seqlen: the longest sequence, as a python int (what varlen kernels take).
        seq_idx: int32 (B*T,) on the device: the sequence each token belongs to.
        shape: (B, T) of the batch these boundaries describe.
        is_packed: whether some row holds more than one real sequence. When False the patched
            model runs exactly the upstream code path.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    seq_idx: torch.Tensor
    shape: tuple[int, int]
    is_packed: bool = True
    #: per-forward memo for backends (e.g. FlexAttention's block masks), never compared.
    cache: dict = field(default_factory=dict, repr=False)
    #: int (B*T,) or None: transformers' ``block_sequence_ids``, flattened. Tokens of one sequence
    #: with the same id >= 0 attend to each other in both directions, on top of the layer's causal
    #: (and window) pattern: an image's tokens (Gemma 3), a prefix (PaliGemma). -1: no block.
    blocks: torch.Tensor | None = field(default=None, repr=False)
    #: sequence parallel: where this rank's slice sits in the stream, and the stream's boundaries
    #: (:class:`hf_varlen_patch.sequence_parallel.SequenceShard`); None for a whole batch
    shard: ClassVar[Any] = None

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def total_tokens(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def position_bound(self) -> int:
        """Every position of this forward is below it (the row length; under sequence parallel,
        the whole stream's): the size a rotary or position table must have."""
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    def position_ids(self) -> torch.Tensor:
        """(B, T) positions restarting at every sequence start (no device sync)."""
        flat = torch.arange(self.total_tokens, device=self.device, dtype=torch.int64)
        starts = self.cu_seqlens.to(torch.int64)[self.seq_idx.to(torch.int64)]
        return (flat - starts).view(self.shape)

    def cu_seqlens_int64(self) -> torch.Tensor:
        """``cu_seqlens`` as int64 (what flash-linear-attention takes), one tensor per forward
        (memoised): fla memoises its chunk indices by the identity of the ``cu_seqlens`` it gets,
        and each computation reads the device (a sync), so every layer must hand it the same one."""
        if "cu_seqlens_int64" not in self.cache:
            self.cache["cu_seqlens_int64"] = self.cu_seqlens.to(torch.int64)
        return self.cache["cu_seqlens_int64"]

    def sequence_starts(self) -> torch.Tensor:
        """Flat indices of the first token of every sequence (int64, on the device)."""
        return self.cu_seqlens[:-1].to(torch.int64)

    def with_blocks(self, blocks: torch.Tensor | None) -> Boundaries:
        """These boundaries with bidirectional blocks ((B, T) or flat ids, -1 for none)."""
        if blocks is not None:
            if blocks.numel() != self.total_tokens:
                raise MalformedBoundariesError(
                    f"block ids hold {blocks.numel()} tokens for a batch of {self.shape}; give one id per token."
                )
            blocks = blocks.reshape(-1).to(self.device)
        return Boundaries(self.cu_seqlens, self.max_seqlen, self.seq_idx, self.shape, self.is_packed, blocks=blocks)

    def chunked(self, size: int) -> Boundaries:
        """These boundaries with every sequence cut into chunks of ``size`` tokens from its start:
        chunked attention (a token sees only its own chunk) is causal attention within chunks.
        Computed once per forward and size (one device sync), then memoised."""
        key = ("chunked", int(size))
        if key not in self.cache:
            positions = self.position_ids().reshape(-1)
            starts = (positions % size == 0).nonzero().reshape(-1)
            cu = torch.cat([starts, starts.new_tensor([self.total_tokens])]).to(torch.int32)
            self.cache[key] = Boundaries(
                cu_seqlens=cu,
                max_seqlen=min(self.max_seqlen, int(size)),
                seq_idx=((positions % size == 0).cumsum(0) - 1).to(torch.int32),
                shape=self.shape,
                is_packed=self.is_packed,
                blocks=self.blocks,
            )
        return self.cache[key]

    def seq_idx_rows(self) -> torch.Tensor:
        """(B, T) int32 sequence index per token (what mamba_ssm and causal_conv1d take as ``seq_idx``)."""
        return self.seq_idx.view(self.shape)

    def start_mask(self) -> torch.Tensor:
        """(B, T) bool: True where a sequence starts (where recurrent state must reset). Memoised."""
        if "start_mask" not in self.cache:
            flat = torch.zeros(self.total_tokens, dtype=torch.bool, device=self.device)
            self.cache["start_mask"] = flat.index_fill(0, self.sequence_starts(), True).view(self.shape)
        return self.cache["start_mask"]

    def sequence_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, valid), both (num_sequences, max_seqlen): the flat token index of each
        sequence's t-th token (clamped where the sequence is shorter) and whether it exists.
        Gathering by ``index`` lays every sequence out as its own row (no device sync; memoised)."""
        if "sequence_rows" not in self.cache:
            cu = self.cu_seqlens.to(torch.int64)
            steps = torch.arange(self.max_seqlen, device=cu.device)
            valid = steps[None, :] < (cu[1:] - cu[:-1])[:, None]
            index = (cu[:-1, None] + steps[None, :]).clamp_max(max(self.total_tokens - 1, 0))
            self.cache["sequence_rows"] = (index, valid)
        return self.cache["sequence_rows"]

    # ------------------------------------------------------------------ builders

    @classmethod
    def from_position_ids(
        cls,
        position_ids: torch.Tensor,
        *,
        shape: tuple[int, int] | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> Boundaries:
        """Derive boundaries from positions that restart at every sequence start.

        A sequence starts at every row start and wherever ``pos[t] != pos[t-1] + 1``; with an
        ``attention_mask`` also wherever the mask switches, so padding is a sequence of its own.
        One device-to-host copy of the positions (a single sync) is the whole cost; everything
        else runs on the host and the offsets go back with a non-blocking copy.
        """
        device = position_ids.device
        pos = _check_position_ids(position_ids, shape)
        batch, length = pos.shape
        mask = _check_attention_mask(attention_mask, (batch, length))

        pos_host = pos.detach().to("cpu", torch.int64)
        if int(pos_host.min()) < 0:
            raise MalformedBoundariesError(
                "position_ids has negative values; packed positions must count 0, 1, 2, ... from each sequence start."
            )
        starts = torch.ones(batch, length, dtype=torch.bool)
        starts[:, 1:] = pos_host[:, 1:] != pos_host[:, :-1] + 1
        real = None
        if mask is not None:
            real = mask.detach().to("cpu", torch.bool)
            switches = real[:, 1:] != real[:, :-1]
            # a real token after padding that follows real tokens of its row (left padding, before
            # a row's first real token, needs no restart: generate() and tokenizers build it)
            resumed = real[:, 1:] & ~real[:, :-1] & (real.cumsum(1)[:, :-1] > 0)
            if bool((resumed & ~starts[:, 1:]).any()):
                raise MalformedBoundariesError(
                    "attention_mask has padding (0) inside a packed sequence: a real token that "
                    "follows padding must start a new sequence (its position_ids restart at 0). "
                    "Put padding only between or after sequences."
                )
            starts[:, 1:] |= switches
        real_starts = starts if real is None else starts & real
        is_packed = bool((real_starts.sum(dim=1) > 1).any())

        flat_starts = starts.flatten().nonzero().flatten()
        total = batch * length
        cu_host = torch.cat([flat_starts, torch.tensor([total])]).to(torch.int32)
        max_seqlen = int((cu_host[1:] - cu_host[:-1]).max()) if total else 0
        seq_idx_host = (starts.flatten().cumsum(0) - 1).to(torch.int32)
        return cls(
            cu_seqlens=_to_device(cu_host, device),
            max_seqlen=max_seqlen,
            seq_idx=_to_device(seq_idx_host, device),
            shape=(batch, length),
            is_packed=is_packed,
        )

    @classmethod
    def from_cu_seqlens(
        cls,
        cu_seqlens: torch.Tensor,
        max_seqlen: int | torch.Tensor | None,
        *,
        shape: tuple[int, int],
        check: bool = True,
        cu_seqlens_k: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        seq_idx: torch.Tensor | None = None,
    ) -> Boundaries:
        """Take boundaries as given (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``).

        No device sync unless ``check`` is True and the offsets live on an accelerator: then one
        copy to the host validates them (increasing, ending at B*T, no sequence across rows,
        ``max_seqlen`` large enough, equal to ``cu_seqlens_k`` if given, no padding in
        ``attention_mask``, ``position_ids`` (the (B, T) text positions) counting 0, 1, 2, ... from
        every offset, ``seq_idx`` changing exactly at the offsets). Pass ``check=False`` only for
        trusted collators. The check is a
        custom op, so under torch.compile it stays inside the graph. ``max_seqlen=None`` reads the
        longest sequence from the offsets (a sync).
        """
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.ndim != 1:
            raise MalformedBoundariesError(
                "cu_seq_lens must be a 1-D integer tensor of sequence offsets (0, ..., total tokens); "
                f"got {type(cu_seqlens).__name__} with shape {getattr(cu_seqlens, 'shape', None)}."
            )
        if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
            raise MalformedBoundariesError(f"cu_seq_lens must hold integers, got {cu_seqlens.dtype}; use torch.int32.")
        batch, length = shape
        total = batch * length
        if max_seqlen is None:
            max_seqlen = (cu_seqlens[1:] - cu_seqlens[:-1]).max()
        if isinstance(max_seqlen, torch.Tensor):
            max_seqlen = int(max_seqlen)
        # an int from the collator stays as given: under torch.compile it is a symbolic size, and
        # int() on it would specialise the graph to every new value (a recompile per batch)
        if check or cu_seqlens.device.type == "cpu":
            cu = torch.ops.hf_varlen.checked_cu_seqlens(
                cu_seqlens, cu_seqlens_k, attention_mask, max_seqlen, batch, length, position_ids, seq_idx
            )
        else:
            cu = cu_seqlens.to(torch.int32)
        flat = torch.arange(total, device=cu.device, dtype=torch.int32)
        # over the whole offsets, not ``cu[1:]``: inductor's Triton searchsorted ignores a slice's
        # storage offset (pytorch#182343), which would put every token in the next sequence
        seq_idx = (torch.searchsorted(cu, flat, right=True) - 1).to(torch.int32)
        return cls(cu_seqlens=cu, max_seqlen=max_seqlen, seq_idx=seq_idx, shape=(batch, length), is_packed=True)


@torch.library.custom_op("hf_varlen::checked_cu_seqlens", mutates_args=())
def _checked_cu_seqlens(
    cu_seqlens: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    max_seqlen: int,
    batch: int,
    length: int,
    position_ids: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """The offsets as int32 after validating them on the host (raises MalformedBoundariesError)."""
    host = cu_seqlens.detach().to("cpu", torch.int64)
    if cu_seqlens_k is not None and not torch.equal(host, cu_seqlens_k.detach().to("cpu", torch.int64)):
        raise MalformedBoundariesError(
            "cu_seq_lens_q and cu_seq_lens_k differ; packed self-attention needs the same "
            "boundaries for queries and keys (no cache)."
        )
    if attention_mask is not None and not bool(attention_mask.all()):
        raise MalformedBoundariesError(
            "attention_mask has padding but cu_seq_lens_q/k were given; describe padding as a "
            "sequence of its own in cu_seq_lens (or pass position_ids and the mask instead)."
        )
    _validate_cu_seqlens(host, max_seqlen, batch, length)
    if position_ids is not None:
        expected = _positions_from_offsets(host, batch * length)
        given = position_ids.detach().to("cpu", torch.int64).expand(batch, length).reshape(-1)
        if not torch.equal(given, expected):
            where = int((given != expected).nonzero()[0])
            raise MalformedBoundariesError(
                f"position_ids disagree with cu_seq_lens: token {where} (row {where // length}) has position "
                f"{int(given[where])}, but the offsets put it at position {int(expected[where])} of its sequence. "
                "Pass the positions the collator built with these offsets (0, 1, 2, ... from every sequence "
                "start), or only one of the two."
            )
    if seq_idx is not None:
        _check_seq_idx(seq_idx, host, batch, length)
    return cu_seqlens.to(torch.int32, copy=True)


@_checked_cu_seqlens.register_fake
def _(cu_seqlens, cu_seqlens_k, attention_mask, max_seqlen, batch, length, position_ids=None, seq_idx=None):
    return torch.empty_like(cu_seqlens, dtype=torch.int32)


def _positions_from_offsets(cu: torch.Tensor, total: int) -> torch.Tensor:
    flat = torch.arange(total, dtype=torch.int64)
    return flat - cu[torch.searchsorted(cu, flat, right=True) - 1]


def _check_seq_idx(seq_idx: torch.Tensor, cu: torch.Tensor, batch: int, length: int) -> None:
    """``seq_idx`` (what TRL and flattening collators send for recurrent kernels) must change value
    exactly where a sequence of the offsets starts (numbered per row or over the batch alike)."""
    if not isinstance(seq_idx, torch.Tensor) or seq_idx.numel() != batch * length:
        raise MalformedBoundariesError(
            f"seq_idx must hold one sequence index per token, shape ({batch}, {length}); got "
            f"{tuple(getattr(seq_idx, 'shape', ()))}."
        )
    rows = seq_idx.detach().to("cpu", torch.int64).reshape(batch, length)
    changes = torch.ones(batch, length, dtype=torch.bool)
    changes[:, 1:] = rows[:, 1:] != rows[:, :-1]
    starts = torch.zeros(batch * length, dtype=torch.bool)
    starts[cu[:-1]] = True
    if not torch.equal(changes.reshape(-1), starts):
        where = int((changes.reshape(-1) != starts).nonzero()[0])
        raise MalformedBoundariesError(
            f"seq_idx disagrees with the packed boundaries at token {where} (row {where // length}): it "
            f"{'starts' if bool(changes.reshape(-1)[where]) else 'does not start'} a sequence there and the "
            "position_ids / cu_seq_lens say otherwise. Pass the seq_idx the collator built with them, or none."
        )


def check_seq_idx(seq_idx: torch.Tensor, boundaries: Boundaries) -> None:
    """Raise MalformedBoundariesError unless ``seq_idx`` marks the same sequences (one host copy)."""
    batch, length = boundaries.shape
    _check_seq_idx(seq_idx, boundaries.cu_seqlens.detach().to("cpu", torch.int64), batch, length)


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _check_position_ids(position_ids: torch.Tensor, shape: tuple[int, int] | None) -> torch.Tensor:
    if not isinstance(position_ids, torch.Tensor):
        raise MalformedBoundariesError(f"position_ids must be a tensor, got {type(position_ids).__name__}.")
    if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
        raise MalformedBoundariesError(
            f"position_ids must be an integer tensor, got {position_ids.dtype}; use torch.long."
        )
    pos = position_ids
    if pos.ndim == 1:
        pos = pos.unsqueeze(0)
    if pos.ndim == 3:
        pos = text_positions(pos)
    if pos.ndim != 2:
        raise MalformedBoundariesError(
            f"position_ids must have shape (batch, seq_len) (or (3|4, batch, seq_len) for multimodal "
            f"rotary positions), got {tuple(position_ids.shape)}."
        )
    if shape is not None:
        batch, length = shape
        if pos.shape[1] != length or pos.shape[0] not in (1, batch):
            raise MalformedBoundariesError(
                f"position_ids has shape {tuple(position_ids.shape)} but input_ids has shape "
                f"{(batch, length)}; give one position per token, shape (batch, seq_len)."
            )
        pos = pos.expand(batch, length)
    return pos


def _check_attention_mask(mask: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.ndim != 2 or tuple(mask.shape) != shape:
        raise MalformedBoundariesError(
            f"attention_mask has shape {tuple(mask.shape)}; a packed batch needs a 2-D (batch, "
            f"seq_len) = {shape} mask of 1 (real token) and 0 (padding), or none."
        )
    return mask


def _validate_cu_seqlens(cu: torch.Tensor, max_seqlen: int, batch: int, length: int) -> None:
    total = batch * length
    if cu.numel() < 2 or int(cu[0]) != 0:
        raise MalformedBoundariesError(
            f"cu_seq_lens must start at 0 and hold at least one sequence, got {cu.tolist()[:8]}..."
        )
    lengths = cu[1:] - cu[:-1]
    if bool((lengths <= 0).any()):
        raise MalformedBoundariesError(
            "cu_seq_lens must be strictly increasing (every sequence has at least one token); "
            f"got {cu.tolist()[:16]}{'...' if cu.numel() > 16 else ''}."
        )
    if int(cu[-1]) != total:
        raise MalformedBoundariesError(
            f"cu_seq_lens ends at {int(cu[-1])} but the batch holds {total} tokens "
            f"({batch} x {length}); the last offset must equal the token count."
        )
    row_starts = torch.arange(0, total, length)
    if not bool(torch.isin(row_starts, cu).all()):
        raise MalformedBoundariesError(
            "a sequence in cu_seq_lens crosses a row boundary of the (batch, seq_len) input; "
            "with batch > 1 every row must start a sequence (or flatten the batch to one row)."
        )
    if int(max_seqlen) < int(lengths.max()):
        raise MalformedBoundariesError(
            f"max_length_q/k is {max_seqlen} but the longest sequence in cu_seq_lens has "
            f"{int(lengths.max())} tokens; pass the true maximum."
        )


def text_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """The (batch, seq_len) positions whose restarts mark the sequences of multimodal rotary
    (mRoPE) ``position_ids``.

    ``(4, B, T)`` is transformers' packed layout: a text row (restarting per sequence) before the
    temporal, height and width rows; the text row is returned. ``(3, B, T)`` has no text row: every
    sample's first token, text or image patch, sits at (0, 0, 0) and no later one does (text and
    images after it start above 0, a video's later frames too), so a sequence starts at every
    all-zero position; positions counting from those starts are returned (one device-to-host copy).
    The temporal row alone cannot tell: it falls back inside a sample after a video.
    """
    if position_ids.shape[0] == 4:
        return position_ids[0]
    if position_ids.shape[0] != 3:
        raise MalformedBoundariesError(
            f"3-D position_ids must be mRoPE rows, shape (3, batch, seq_len) or (4, batch, seq_len) with "
            f"a text row first; got {tuple(position_ids.shape)}."
        )
    rows = position_ids.detach().to("cpu", torch.int64)
    starts = (rows == 0).all(dim=0)
    starts[:, 0] = True
    index = torch.arange(starts.shape[1]).expand_as(starts)
    last_start = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return (index - last_start).to(position_ids.device)
