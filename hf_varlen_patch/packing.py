"""The data side of packing: bin tokenized examples into rows and collate them into a packed batch.

:func:`pack_into_bins` decides which examples share a row (first-fit or best-fit decreasing);
:class:`PackingCollator` turns the examples a DataLoader yields into a packed batch of several rows
that a patched model (:func:`hf_varlen_patch.apply`) runs exactly as if every example ran alone::

    collator = PackingCollator(max_tokens=4096, pad_token_id=tokenizer.pad_token_id)
    Trainer(model=hf_varlen_patch.apply(model), data_collator=collator, ...)

Packing at collation time keeps the dataset untouched (no offline ``pack_dataset`` pass, shuffling
still works per example) and turns a batch of ``per_device_train_batch_size`` examples into as few
rows as fit, instead of padding every example to the longest one.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import VarlenPatchError

__all__ = ["STRATEGIES", "IGNORE_INDEX", "SampleTooLongError", "pack_into_bins", "PackingCollator", "pack_multimodal"]

#: The bin-packing strategies :func:`pack_into_bins` knows.
STRATEGIES = ("ffd", "bfd")
#: The label every transformers loss ignores: sequence starts and padding get it.
IGNORE_INDEX = -100


class SampleTooLongError(VarlenPatchError, ValueError):
    """A sample has more tokens than a packed row holds (``max_tokens``).

    Attributes ``index``, ``length`` and ``max_tokens`` say which sample, how long, and the limit.
    """

    def __init__(self, index: int, length: int, max_tokens: int) -> None:
        self.index, self.length, self.max_tokens = index, length, max_tokens
        super().__init__(
            f"sample {index} has {length} tokens, more than max_tokens={max_tokens} fit in one packed row; "
            f"raise max_tokens to at least {length}, or truncate the sample to {max_tokens} tokens beforehand "
            "(truncate=True cuts it here, dropping its tail)."
        )


def pack_into_bins(
    lengths: Sequence[int], max_tokens: int, strategy: str = "ffd", *, truncate: bool = False
) -> list[list[int]]:
    """Group sample indices into rows of at most ``max_tokens`` tokens.

    Samples are placed longest first (ties: lower index first), each into:

    - ``"ffd"`` (first-fit decreasing): the first row it fits in;
    - ``"bfd"`` (best-fit decreasing, as TRL's ``pack_dataset(strategy="bfd")``): the row it fills
      best (least room left; among equally full rows the one that got that full first, as TRL).

    A new row opens only when the sample fits in none. Both use at most 11/9 OPT + 6/9 rows (OPT:
    the fewest possible) and never more than next-fit over the same decreasing order; they run in
    O(n log n). The result is deterministic: rows in the order they were opened, each listing its
    indices in the order they were placed (every index exactly once).

    A sample longer than ``max_tokens`` raises :class:`SampleTooLongError` (a ``ValueError``) naming
    it, unless ``truncate=True``: then it counts as ``max_tokens`` long, and the caller must cut it
    to that (keeping its first ``max_tokens`` tokens, as :class:`PackingCollator` does). Zero-length
    samples take no room and join the first row that has them fit.
    """
    _check_budget(max_tokens, strategy)
    sizes = []
    for index, length in enumerate(lengths):
        length = int(length)
        if length < 0:
            raise ValueError(f"sample {index} has a negative length ({length}).")
        if length > max_tokens:
            if not truncate:
                raise SampleTooLongError(index, length, max_tokens)
            length = max_tokens
        sizes.append(length)
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    place = _first_fit if strategy == "ffd" else _best_fit
    return place(order, sizes, max_tokens)


def _check_budget(max_tokens: Any, strategy: Any) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown packing strategy {strategy!r}; use one of {STRATEGIES}.")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}.")


def _first_fit(order: list[int], sizes: list[int], capacity: int) -> list[list[int]]:
    """First fit via a max-tree over the room left in every row that could ever open (one per
    sample): unopened rows have full room, so the leftmost row with room is an open one if any
    fits, else the next row to open."""
    leaves = 1 << max(len(order) - 1, 0).bit_length()
    room = [0] * leaves + [capacity] * len(order) + [0] * (leaves - len(order))
    for node in range(leaves - 1, 0, -1):
        room[node] = max(room[2 * node], room[2 * node + 1])
    rows: list[list[int]] = []
    for index in order:
        need = sizes[index]
        node = 1
        while node < leaves:
            node = 2 * node if room[2 * node] >= need else 2 * node + 1
        row = node - leaves
        if row == len(rows):
            rows.append([])
        rows[row].append(index)
        room[node] -= need
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return rows


def _best_fit(order: list[int], sizes: list[int], capacity: int) -> list[list[int]]:
    """Best fit: the open rows by room left (a sorted list of the distinct amounts), and for each
    amount the rows that have it, in the order they came to have it (TRL's tie rule)."""
    rows: list[list[int]] = []
    amounts: list[int] = []  # sorted distinct room left of open rows
    with_room: dict[int, deque[int]] = {}
    for index in order:
        need = sizes[index]
        at = bisect.bisect_left(amounts, need)
        if at < len(amounts):
            left = amounts[at]
            row = with_room[left].popleft()
            if not with_room[left]:
                del with_room[left], amounts[at]
        else:
            left, row = capacity, len(rows)
            rows.append([])
        rows[row].append(index)
        left -= need
        if left not in with_room:
            with_room[left] = deque()
            bisect.insort(amounts, left)
        with_room[left].append(row)
    return rows


def _as_token_list(value: Any, what: str, index: int) -> list[int]:
    """A 1-D list, tensor or array of token ids as a python list."""
    if hasattr(value, "tolist"):
        if getattr(value, "ndim", 1) != 1:
            raise ValueError(
                f"example {index}: {what} must be 1-D (one example's tokens), got shape {tuple(value.shape)}; "
                "tokenize without return_tensors, or index the batch dimension away."
            )
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"example {index}: {what} must be a list or 1-D tensor of ints, got {type(value).__name__}.")
    return [int(v) for v in value]


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


@dataclass
class PackingCollator:
    """Collate tokenized examples into a packed batch of several rows (``Trainer(data_collator=...)``).

    Each example is a mapping with ``input_ids`` and optionally ``labels`` (-100 where no loss is
    wanted, e.g. the prompt), as lists, tensors or arrays. An ``attention_mask``, if present, must be
    all ones (padding inside an example would be packed as if it were text); other keys are ignored.
    Empty examples are dropped. The examples are binned into rows of at most ``max_tokens`` tokens
    (:func:`pack_into_bins` with ``strategy``; :meth:`layout` tells which example went where), each
    row flattened with transformers' ``DataCollatorWithFlattening``, and the batch is:

    - ``input_ids`` (R, L) int64: the rows, padded at the end with ``pad_token_id``. L is the longest
      row rounded up to ``pad_to_multiple_of`` (static shapes for compiled graphs and kernels; with
      ``pad_to_multiple_of=max_tokens`` every batch is (R, max_tokens));
    - ``position_ids`` (R, L) int64: 0, 1, 2, ... from every sequence start, and from 0 again over
      the padding, so the padding is a sequence of its own;
    - ``labels`` (R, L) int64: the example's labels (default: its input_ids) with -100 at each
      sequence's first token and on the padding. No loss term predicts across a boundary, and
      counting targets gives the same ``num_items_in_batch`` whether a Trainer counts ``labels !=
      -100`` as they are (transformers 4.x) or shifted (5.x): a row's first label is always -100;
    - with ``return_flash_attn_kwargs`` (the name transformers uses): ``cu_seq_lens_q`` /
      ``cu_seq_lens_k`` (int32) offsets over the flattened R*L tokens of every sequence, the padding
      included as one, and ``max_length_q`` / ``max_length_k`` (python int): the longest of them;
    - with ``return_seq_idx``: ``seq_idx`` (R, L) int32, the index of every token's sequence counted
      over the flattened batch (padding included), i.e. ``Boundaries.seq_idx_rows()`` of these
      boundaries and what ``DataCollatorWithFlattening(return_seq_idx=True)`` gives for one row.

    No ``attention_mask`` is returned: the boundaries are in ``position_ids`` (or ``cu_seq_lens``),
    and a padding mask next to ``cu_seq_lens`` is refused by the patched model. Padding never
    reaches a real token: it comes after every real token of its row and is a sequence of its own.
    Padding tokens still flow through token-wise layers (as in any padded batch), so statistics
    over all tokens, like an MoE router's auxiliary loss, count them.

    Args:
        max_tokens: the most tokens per row. An example longer than that raises
            :class:`SampleTooLongError`, unless ``truncate``.
        pad_token_id: the token id of the padding.
        strategy: ``"ffd"`` or ``"bfd"`` (see :func:`pack_into_bins`).
        truncate: cut examples longer than ``max_tokens`` to their first ``max_tokens`` tokens.
        pad_to_multiple_of: round the row length L up to a multiple of this.
        return_flash_attn_kwargs: also return ``cu_seq_lens_q/k`` and ``max_length_q/k``.
        return_seq_idx: also return ``seq_idx``.
    """

    max_tokens: int
    pad_token_id: int = 0
    strategy: str = "ffd"
    truncate: bool = False
    pad_to_multiple_of: int | None = None
    return_flash_attn_kwargs: bool = False
    return_seq_idx: bool = False
    _flatten: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from transformers import DataCollatorWithFlattening

        _check_budget(self.max_tokens, self.strategy)
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {self.pad_to_multiple_of!r}.")
        # one row at a time: it flattens a row's examples, restarts positions, and puts -100 at every start
        self._flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def _examples(self, features: Sequence[Mapping[str, Any]]) -> list[dict[str, list[int]] | None]:
        """Every feature as {input_ids, labels} lists, truncated if asked; None for an empty one."""
        out: list[dict[str, list[int]] | None] = []
        for index, feature in enumerate(features):
            ids = _as_token_list(feature["input_ids"], "input_ids", index)
            labels = ids if feature.get("labels") is None else _as_token_list(feature["labels"], "labels", index)
            if len(labels) != len(ids):
                raise ValueError(f"example {index} has {len(ids)} input_ids but {len(labels)} labels.")
            mask = feature.get("attention_mask")
            if mask is not None and not all(int(m) == 1 for m in _as_token_list(mask, "attention_mask", index)):
                raise ValueError(
                    f"example {index} has padding (attention_mask 0); pack unpadded examples (tokenize with "
                    "padding=False), the collator pads the rows itself."
                )
            if len(ids) > self.max_tokens:
                if not self.truncate:
                    raise SampleTooLongError(index, len(ids), self.max_tokens)
                ids, labels = ids[: self.max_tokens], labels[: self.max_tokens]
            out.append({"input_ids": ids, "labels": labels} if ids else None)
        return out

    def layout(self, features: Sequence[Mapping[str, Any]]) -> list[list[int]]:
        """Which examples each row of ``self(features)`` holds, in order: indices into ``features``
        (empty examples are in no row)."""
        return self._layout(self._examples(features))

    def _layout(self, examples: list[dict[str, list[int]] | None]) -> list[list[int]]:
        kept = [i for i, e in enumerate(examples) if e is not None]
        if not kept:
            raise ValueError("PackingCollator got a batch in which every example is empty.")
        lengths = [len(examples[i]["input_ids"]) for i in kept]
        return [[kept[j] for j in row] for row in pack_into_bins(lengths, self.max_tokens, self.strategy)]

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """The packed batch of ``features`` (see the class docstring for its keys)."""
        examples = self._examples(features)
        layout = self._layout(examples)
        rows = [self._flatten([examples[i] for i in row], return_tensors="pt") for row in layout]
        used = [int(row["input_ids"].shape[1]) for row in rows]
        width = _round_up(max(used), self.pad_to_multiple_of)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.cat([torch.nn.functional.pad(r[key], (0, width - n), value=value) for r, n in zip(rows, used)])

        batch: dict[str, Any] = {
            "input_ids": pad("input_ids", self.pad_token_id),
            "position_ids": pad("position_ids", 0),
            "labels": pad("labels", IGNORE_INDEX),
        }
        # every sequence's length, row by row over the flattened batch; a row's padding is one more,
        # whose positions restart at 0 so that position_ids alone also say where it begins
        segments: list[int] = []
        for r, (row, n) in enumerate(zip(layout, used)):
            segments += [len(examples[i]["input_ids"]) for i in row]
            if n < width:
                segments.append(width - n)
                batch["position_ids"][r, n:] = torch.arange(width - n)
        if self.return_flash_attn_kwargs:
            cu = torch.tensor([0, *segments], dtype=torch.int64).cumsum(0).to(torch.int32)
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu  # one tensor: nothing to compare
            batch["max_length_q"] = batch["max_length_k"] = max(segments)
        if self.return_seq_idx:
            ids = torch.arange(len(segments), dtype=torch.int32)
            batch["seq_idx"] = ids.repeat_interleave(torch.tensor(segments)).view(len(rows), width)
        return batch


#: Per-token keys of processor outputs: concatenated along the sequence.
PER_TOKEN_KEYS = ("input_ids", "labels", "mm_token_type_ids", "token_type_ids")


def pack_multimodal(samples: Sequence[Mapping[str, Any]], *, flash_attn_kwargs: bool = True) -> dict[str, Any]:
    """One packed row from the processor outputs of several image/video-text samples.

    Each sample is what a processor returns for one example (batch dimension 1, no padding):
    ``input_ids`` (1, n) with the model's image/video placeholder tokens, optionally ``labels``,
    ``mm_token_type_ids``/``token_type_ids`` (1, n), and its vision inputs (``pixel_values``,
    ``image_grid_thw``, ``pixel_values_videos``, ``video_grid_thw``, ``image_sizes``,
    ``pixel_attention_mask``, ...). The batch a patched model (:func:`hf_varlen_patch.apply`)
    runs exactly as if every sample ran alone:

    - per-token keys concatenated into (1, T); ``labels`` default to ``input_ids``, with -100 at
      every sample start (no loss term predicts across a boundary);
    - ``position_ids`` (1, T): 0, 1, 2, ... from every sample start. mRoPE models (Qwen-VL) get
      their (temporal, height, width) rows computed per sample by the patched model;
    - with ``flash_attn_kwargs``: ``cu_seq_lens_q/k`` (int32) and ``max_length_q/k`` (int);
    - every other tensor concatenated along its first dimension (images in sample order, which
      is the order of their placeholder tokens in the row), zero-padded where later dimensions
      differ (patches per image, images per sample: the padding images and patches processors
      add themselves, which the models skip); lists are concatenated.

    No ``attention_mask`` is returned; a sample whose own mask has padding is refused.
    """
    if not samples:
        raise ValueError("pack_multimodal needs at least one sample.")
    lengths, pieces = [], {}
    for index, sample in enumerate(samples):
        ids = sample.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ValueError(
                f"sample {index}: input_ids must be a (1, n) tensor with n > 0 (one processor output per "
                "sample, return_tensors='pt', no padding)."
            )
        mask = sample.get("attention_mask")
        if isinstance(mask, torch.Tensor) and not bool((mask == 1).all()):
            raise ValueError(
                f"sample {index} has padding (attention_mask 0); run the processor on each sample alone "
                "without padding."
            )
        lengths.append(int(ids.shape[1]))
        for key, value in sample.items():
            if key in ("attention_mask", "position_ids"):
                continue
            pieces.setdefault(key, []).append((index, value))
    missing = [key for key in PER_TOKEN_KEYS if key in pieces and len(pieces[key]) != len(samples)]
    if missing:
        raise ValueError(f"{missing[0]} is given for some samples and not for others; give it for all or none.")
    batch: dict[str, Any] = {}
    for key, values in pieces.items():
        tensors = [v for _, v in values]
        if key in PER_TOKEN_KEYS:
            for (index, v), n in zip(values, lengths):
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != (1, n):
                    raise ValueError(f"sample {index}: {key} must have the shape of its input_ids, (1, {n}).")
            batch[key] = torch.cat(tensors, dim=1)
        elif all(isinstance(v, torch.Tensor) for v in tensors):
            batch[key] = _cat_padded(tensors)
        elif all(isinstance(v, (list, tuple)) for v in tensors):
            batch[key] = [x for v in tensors for x in v]
        else:
            batch[key] = tensors[0]  # a scalar or flag the samples share
    labels = batch.get("labels", batch["input_ids"]).clone()
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    labels[0, starts] = IGNORE_INDEX
    batch["labels"] = labels
    batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths])[None]
    if flash_attn_kwargs:
        cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
        batch["max_length_q"] = batch["max_length_k"] = max(lengths)
    return batch


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding every later dimension to the largest."""
    if len({t.ndim for t in tensors}) != 1:
        raise ValueError(f"cannot pack tensors of {sorted({t.ndim for t in tensors})} dimensions together.")
    if tensors[0].ndim == 0:
        return torch.stack(tensors)
    sizes = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].ndim)]
    padded = []
    for t in tensors:
        pad: list[int] = []
        for d in reversed(range(1, t.ndim)):
            pad += [0, sizes[d - 1] - t.shape[d]]
        padded.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return torch.cat(padded, dim=0)
