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

import array
import bisect
import operator
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import MalformedBatchError

__all__ = [
    "STRATEGIES",
    "IGNORE_INDEX",
    "MalformedBatchError",
    "SampleTooLongError",
    "pack_into_bins",
    "PackingCollator",
    "pack_multimodal",
]

#: The bin-packing strategies :func:`pack_into_bins` knows.
STRATEGIES = ("ffd", "bfd")
#: The label every transformers loss ignores: sequence starts and padding get it.
IGNORE_INDEX = -100


class SampleTooLongError(MalformedBatchError):
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
    samples take no room and join the first row that has them fit. Lengths are ints (python, numpy
    or 0-d integer tensors); anything else (a float, a bool, a negative count) raises
    :class:`~hf_varlen_patch.errors.MalformedBatchError`.
    """
    max_tokens = _check_budget(max_tokens, strategy)
    truncate = _flag(truncate, "truncate")
    if isinstance(lengths, (str, bytes, Mapping)) or not isinstance(lengths, Iterable):
        raise MalformedBatchError(
            f"lengths must be a sequence of token counts (ints), got a {type(lengths).__name__}; "
            "give one int per sample, e.g. [len(ids) for ids in samples]."
        )
    sizes = []
    for index, length in enumerate(lengths):
        try:
            length = _index(length)
        except TypeError:
            raise MalformedBatchError(
                f"sample {index} has length {length!r} ({type(length).__name__}); a length counts tokens: "
                "give an int (len(input_ids))."
            ) from None
        if length < 0:
            raise MalformedBatchError(
                f"sample {index} has a negative length ({length}); a length counts tokens: give len(input_ids)."
            )
        if length > max_tokens:
            if not truncate:
                raise SampleTooLongError(index, length, max_tokens)
            length = max_tokens
        sizes.append(length)
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    place = _first_fit if strategy == "ffd" else _best_fit
    return place(order, sizes, max_tokens)


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


# ------------------------------------------------------------------ settings


def _is_bool(value: Any) -> bool:
    """A python, numpy or 0-d torch bool (all of which ``operator.index`` would take as 0 or 1)."""
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.bool
    return type(value).__name__ in ("bool", "bool_")


def _index(value: Any) -> int:
    """``value`` as a python int if it is an int (python, numpy, 0-d integer tensor); TypeError if not."""
    if _is_bool(value):
        raise TypeError("a bool is not a count or an id")
    return operator.index(value)


def _int_setting(value: Any, name: str, minimum: int, fix: str, *, none_ok: bool = False) -> int | None:
    if value is None and none_ok:
        return None
    try:
        number = _index(value)
    except TypeError:
        number = None
    if number is None or number < minimum:
        wanted = f"an int >= {minimum}" + (" or None" if none_ok else "")
        raise MalformedBatchError(f"{name} must be {wanted}, got {value!r}; {fix}")
    return number


def _flag(value: Any, name: str) -> bool:
    """A yes/no setting: a bool, 0 or 1; None (unset) is False."""
    if value is None or (_is_bool(value) and not isinstance(value, torch.Tensor)):
        return bool(value)
    try:
        if _index(value) in (0, 1):
            return bool(value)
    except TypeError:
        pass
    raise MalformedBatchError(f"{name} must be True or False, got {value!r}.")


def _check_budget(max_tokens: Any, strategy: Any) -> int:
    """``max_tokens`` as an int, once it and ``strategy`` are known good."""
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise MalformedBatchError(f"unknown packing strategy {strategy!r}; use one of {STRATEGIES}.")
    try:
        number = _index(max_tokens)
    except TypeError:
        number = None
    if number is None or number < 1:
        raise MalformedBatchError(
            f"max_tokens must be a positive int, got {max_tokens!r}; it is the most tokens one packed row holds."
        )
    return number


# ------------------------------------------------------------------ examples


#: Keys that describe boundaries of a collated batch: an example carrying them is already packed.
BATCH_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
#: Image, video and audio inputs: a text collator would drop them while their placeholder tokens stay.
MEDIA_KEYS = (
    "image_grid_thw", "video_grid_thw", "image_sizes", "input_features", "feature_attention_mask",
    "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask",
)  # fmt: skip


def _is_array(value: Any) -> bool:
    """A numpy (or numpy-like) array or scalar."""
    return not isinstance(value, torch.Tensor) and hasattr(value, "__array__") and hasattr(value, "dtype")


def _is_tensor_like(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or _is_array(value)


def _kind(tensor: torch.Tensor) -> str:
    if tensor.dtype == torch.bool:
        return "bool"
    if tensor.is_complex():
        return "complex"
    return "float" if tensor.is_floating_point() else "int"


def _holds_bools(values: Sequence[Any]) -> bool:
    """Whether a (possibly one level nested) list holds bools, which torch would turn into 0 and 1."""
    types = set(map(type, values))
    for inner in [v for v in values if isinstance(v, (list, tuple))] if types & {list, tuple} else ():
        types |= set(map(type, inner))
    return any(t.__name__ in ("bool", "bool_") for t in types)


def _values(value: Any, where: str, key: str, *, mask: bool = False, processor: bool = False) -> torch.Tensor:
    """One example's per-token ``key`` as a 1-D tensor in its own integer dtype: a list, tuple,
    tensor or array, 1-D or (1, n) (a tokenizer's or processor's batch of one; only (1, n) for a
    ``processor`` output). Floats, bools and complex numbers are refused (``int()`` would cut 5.7
    to 5), except in an attention mask."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
    elif isinstance(value, (list, tuple)):
        if not mask and _holds_bools(value):
            raise MalformedBatchError(
                f"{where}: {key} holds bools; give ints (True and False are no token ids or labels)."
            )
        try:
            flat = array.array("q", value)  # a flat list of ints, read in one C pass (torch.tensor is far slower)
            tensor = torch.frombuffer(flat, dtype=torch.int64) if flat else torch.zeros(0, dtype=torch.int64)
        except (TypeError, OverflowError):
            tensor = None
        try:
            tensor = torch.tensor(value) if tensor is None else tensor
        except (TypeError, ValueError, RuntimeError, OverflowError) as err:
            raise MalformedBatchError(
                f"{where}: {key} is not a flat list of ints ({err}); give one list of python ints per example "
                "(not nested, no None or strings, each within int64)."
            ) from None
        if tensor.numel() == 0:
            tensor = tensor.to(torch.int64)
    elif _is_array(value):
        try:
            tensor = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise MalformedBatchError(
                f"{where}: {key} is an array torch cannot read ({err}); give an integer array, a list of ints "
                "or a tensor."
            ) from None
    else:
        raise MalformedBatchError(
            f"{where}: {key} is of type {type(value).__name__}; give a list of ints, or a 1-D integer tensor or array "
            "(one value per token)."
        )
    kind = _kind(tensor)
    if kind == "complex" or (kind in ("float", "bool") and not mask):
        raise MalformedBatchError(
            f"{where}: {key} holds {kind} values ({tensor.dtype}), not integers; token ids and labels are integers "
            "(a float id would be cut, 5.7 -> 5): give ints (tokenize again, or fix the column's type)."
        )
    if processor and (tensor.ndim != 2 or tensor.shape[0] != 1):
        raise MalformedBatchError(
            f"{where}: {key} has shape {tuple(tensor.shape)}; give it as the processor makes it for one sample, "
            "(1, n) (return_tensors='pt', one sample per call, no padding)."
        )
    if tensor.ndim == 2 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim == 0:
        raise MalformedBatchError(
            f"{where}: {key} is a single value ({tensor.item()!r}), not a sequence; give one value per token, "
            "as a list or a 1-D tensor."
        )
    if tensor.ndim == 2:
        raise MalformedBatchError(
            f"{where}: {key} has shape {tuple(tensor.shape)}, a batch of {tensor.shape[0]} sequences in one example; "
            "give one example per sequence (a batch of columns becomes examples with "
            "[dict(zip(batch, row)) for row in zip(*batch.values())])."
        )
    if tensor.ndim != 1:
        raise MalformedBatchError(
            f"{where}: {key} has shape {tuple(tensor.shape)}; give a 1-D sequence (or (1, n), a batch of one)."
        )
    return tensor


def _first(where_bad: torch.Tensor) -> int:
    return int(where_bad.nonzero()[0, 0])


def _check_ids(ids: torch.Tensor, where: str, key: str) -> None:
    negative = ids < 0
    if bool(negative.any()):
        at = _first(negative)
        raise MalformedBatchError(
            f"{where}: {key} has a negative value ({int(ids[at])} at token {at}); ids index a vocabulary from 0 "
            f"(-100, the ignored label, belongs in labels): give the tokenizer's ids."
        )


def _check_labels(labels: torch.Tensor, n: int, where: str) -> None:
    if len(labels) != n:
        raise MalformedBatchError(
            f"{where} has {n} input_ids but {len(labels)} labels; give one label per token "
            f"(-100 where no loss is wanted), or no labels (they default to input_ids)."
        )
    bad = (labels < 0) & (labels != IGNORE_INDEX)
    if bool(bad.any()):
        at = _first(bad)
        raise MalformedBatchError(
            f"{where}: labels has {int(labels[at])} at token {at}; a label is a token id (>= 0) or "
            f"{IGNORE_INDEX} (no loss there), the only negative value transformers' losses ignore."
        )


def _check_row_keys(example: Mapping[str, Any], n: int, where: str) -> None:
    """What an example may say about its own layout: an all-ones ``attention_mask``, ``position_ids``
    0, 1, ..., n-1 and ``seq_lengths`` [n]; anything else means padding or an already packed example."""
    mask = example.get("attention_mask")
    if mask is not None:
        mask = _values(mask, where, "attention_mask", mask=True)
        if len(mask) != n:
            raise MalformedBatchError(
                f"{where} has {n} input_ids but an attention_mask of {len(mask)}; give one mask value per token."
            )
        ones = mask == 1
        if not bool(ones.all()):
            if bool((ones | (mask == 0)).all()):
                raise MalformedBatchError(
                    f"{where} has padding (attention_mask 0); pack unpadded examples (tokenize with "
                    "padding=False, or run the processor on each sample alone): the packer pads the rows itself."
                )
            raise MalformedBatchError(f"{where}: attention_mask holds values other than 0 and 1; give a 0/1 mask.")
    positions = example.get("position_ids")
    if positions is not None:
        positions = _values(positions, where, "position_ids")
        expected = torch.arange(n, device=positions.device)
        if len(positions) != n or not torch.equal(positions.to(torch.int64), expected):
            restarts = len(positions) == n and n > 1 and bool((positions[1:] == 0).any())
            why = (
                "restart at 0 inside the example: it is already packed (several sequences in one example, e.g. "
                "from TRL's pack_dataset), and this packer would number it as one sequence"
                if restarts
                else "are not 0, 1, ..., n-1, and this packer numbers every example from 0 itself"
            )
            raise MalformedBatchError(
                f"{where}: position_ids {why}; give unpacked examples without position_ids (or with 0..n-1), "
                "e.g. SFTConfig(packing=False), or collate packed rows with DataCollatorWithFlattening."
            )
    seq_lengths = example.get("seq_lengths")
    if seq_lengths is not None:
        counts = [c for c in _values(seq_lengths, where, "seq_lengths").tolist() if c]
        if len(counts) > 1:
            raise MalformedBatchError(
                f"{where}: seq_lengths {counts} say it is already packed (several sequences in one example, from "
                "TRL's pack_dataset), and this packer would number it as one sequence; give unpacked examples "
                "(SFTConfig(packing=False)), or collate packed rows with TRL's own collator."
            )
        if sum(counts) != n:
            raise MalformedBatchError(
                f"{where}: seq_lengths {counts} do not add up to its {n} input_ids; drop seq_lengths (or fix it)."
            )
    for key in BATCH_KEYS:
        if key in example:
            raise MalformedBatchError(
                f"{where} has {key}, a key of a collated batch, not of one example; give the examples before "
                "collation (a packed batch goes to the model as it is)."
            )


def _as_list(items: Any, what: str, one: str) -> list[Any]:
    """The examples (samples) as a list of mappings."""
    if isinstance(items, Mapping):
        raise MalformedBatchError(
            f"{what} takes a list of {one}s (one mapping each), got one mapping with keys "
            f"{sorted(map(str, items))[:6]}; if it is a batch of columns, give "
            "[dict(zip(batch, row)) for row in zip(*batch.values())]."
        )
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise MalformedBatchError(f"{what} takes a list of {one}s (one mapping each), got a {type(items).__name__}.")
    items = list(items)
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise MalformedBatchError(
                f"{one} {index} is a {type(item).__name__}, not a mapping; give each {one} as a dict such as "
                "{'input_ids': [...]}."
            )
        if item.get("input_ids") is None:
            raise MalformedBatchError(
                f"{one} {index} has no input_ids (keys: {sorted(map(str, item))}); every {one} needs its token ids."
            )
    return items


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


@dataclass
class PackingCollator:
    """Collate tokenized examples into a packed batch of several rows (``Trainer(data_collator=...)``).

    Each example is a mapping with ``input_ids`` and optionally ``labels`` (-100 where no loss is
    wanted, e.g. the prompt): lists of ints, or integer tensors or arrays, 1-D or (1, n). An
    ``attention_mask``, if present, must be all ones (padding inside an example would be packed as
    if it were text), ``position_ids`` 0..n-1 and TRL's ``seq_lengths`` [n] (an example packed
    already would be numbered as one sequence); other keys are ignored, except image/video inputs
    (``pixel_values``, ...: use :func:`pack_multimodal`). Anything else (float, bool or negative
    ids, a batch dimension above 1, mismatched lengths, bad settings) raises
    :class:`~hf_varlen_patch.errors.MalformedBatchError` naming the example, the key and the fix.
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
        pad_token_id: the token id of the padding (None: 0; no real token sees the padding).
        strategy: ``"ffd"`` or ``"bfd"`` (see :func:`pack_into_bins`).
        truncate: cut examples longer than ``max_tokens`` to their first ``max_tokens`` tokens.
        pad_to_multiple_of: round the row length L up to a multiple of this.
        return_flash_attn_kwargs: also return ``cu_seq_lens_q/k`` and ``max_length_q/k``.
        return_seq_idx: also return ``seq_idx``.
    """

    max_tokens: int
    pad_token_id: int | None = 0
    strategy: str = "ffd"
    truncate: bool = False
    pad_to_multiple_of: int | None = None
    return_flash_attn_kwargs: bool = False
    return_seq_idx: bool = False
    _flatten: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from transformers import DataCollatorWithFlattening

        self._check_settings()
        # one row at a time: it flattens a row's examples, restarts positions, and puts -100 at every start
        self._flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)

    def _check_settings(self) -> None:
        """Refuse (MalformedBatchError) or normalise the settings; run again at every call, since
        the fields stay writable."""
        self.max_tokens = _check_budget(self.max_tokens, self.strategy)
        pad = 0 if self.pad_token_id is None else self.pad_token_id  # no pad token: any id serves, none is seen
        self.pad_token_id = _int_setting(pad, "pad_token_id", 0, "give a token id of the vocabulary.")
        self.pad_to_multiple_of = _int_setting(
            self.pad_to_multiple_of, "pad_to_multiple_of", 1, "it rounds the row length up.", none_ok=True
        )
        for name in ("truncate", "return_flash_attn_kwargs", "return_seq_idx"):
            setattr(self, name, _flag(getattr(self, name), name))

    def _examples(self, features: Sequence[Mapping[str, Any]]) -> list[dict[str, list[int]] | None]:
        """Every feature as {input_ids, labels} lists, checked and truncated if asked; None for an empty one."""
        self._check_settings()
        out: list[dict[str, list[int]] | None] = []
        for index, feature in enumerate(_as_list(features, "PackingCollator", "example")):
            where = f"example {index}"
            media = [k for k in feature if str(k).startswith("pixel_values") or k in MEDIA_KEYS]
            if media:
                raise MalformedBatchError(
                    f"{where} has {media[0]}: PackingCollator packs text and would drop it, leaving the "
                    "placeholder tokens without their images; pack image/video samples with pack_multimodal."
                )
            ids = _values(feature["input_ids"], where, "input_ids")
            _check_ids(ids, where, "input_ids")
            n = len(ids)
            _check_row_keys(feature, n, where)
            labels = feature.get("labels")
            if labels is not None:
                labels = _values(labels, where, "labels")
                _check_labels(labels, n, where)
            ids_list = ids.tolist()
            labels_list = ids_list if labels is None else labels.tolist()
            if n > self.max_tokens:
                if not self.truncate:
                    raise SampleTooLongError(index, n, self.max_tokens)
                ids_list, labels_list = ids_list[: self.max_tokens], labels_list[: self.max_tokens]
            out.append({"input_ids": ids_list, "labels": labels_list} if n else None)
        return out

    def layout(self, features: Sequence[Mapping[str, Any]]) -> list[list[int]]:
        """Which examples each row of ``self(features)`` holds, in order: indices into ``features``
        (empty examples are in no row)."""
        return self._layout(self._examples(features))

    def _layout(self, examples: list[dict[str, list[int]] | None]) -> list[list[int]]:
        kept = [i for i, e in enumerate(examples) if e is not None]
        if not kept:
            raise MalformedBatchError(
                f"PackingCollator got {'no examples' if not examples else 'a batch in which every example is empty'}"
                "; give at least one example with tokens."
            )
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

    - per-token keys concatenated into (1, T) (each given as (1, n) or (n,): tensor, array or list
      of ints); ``labels`` (int64) default to ``input_ids`` for a sample without them, with -100 at
      every sample start (no loss term predicts across a boundary);
    - ``position_ids`` (1, T): 0, 1, 2, ... from every sample start. mRoPE models (Qwen-VL) get
      their (temporal, height, width) rows computed per sample by the patched model;
    - with ``flash_attn_kwargs``: ``cu_seq_lens_q/k`` (int32) and ``max_length_q/k`` (int);
    - every other tensor concatenated along its first dimension (images in sample order, which
      is the order of their placeholder tokens in the row), zero-padded where later dimensions
      differ (patches per image, images per sample: the padding images and patches processors
      add themselves, which the models skip); where some samples give a key as a list or array
      and others as a tensor, the lists become tensors; where all give lists, they are
      concatenated; any other value must be the same in every sample.

    No ``attention_mask`` is returned; a sample whose own mask has padding is refused, and so is
    every input that cannot be packed as it is (:class:`~hf_varlen_patch.errors.MalformedBatchError`
    naming the sample, the key and the fix).
    """
    flash_attn_kwargs = _flag(flash_attn_kwargs, "flash_attn_kwargs")
    samples = _as_list(samples, "pack_multimodal", "sample")
    if not samples:
        raise MalformedBatchError("pack_multimodal needs at least one sample.")
    lengths: list[int] = []
    per_token: dict[str, dict[int, torch.Tensor]] = {}
    others: dict[str, list[tuple[int, Any]]] = {}
    for index, sample in enumerate(samples):
        where = f"sample {index}"
        ids = _values(sample["input_ids"], where, "input_ids", processor=True)
        _check_ids(ids, where, "input_ids")
        n = len(ids)
        if n == 0:
            raise MalformedBatchError(f"{where} has no tokens; drop empty samples before packing.")
        _check_row_keys(sample, n, where)
        lengths.append(n)
        for key, value in sample.items():
            if key in ("attention_mask", "position_ids", "seq_lengths") or value is None:
                continue
            if key not in PER_TOKEN_KEYS:
                others.setdefault(key, []).append((index, value))
                continue
            values = ids if key == "input_ids" else _values(value, where, key, processor=True)
            if key == "labels":
                _check_labels(values, n, where)
            elif len(values) != n:
                raise MalformedBatchError(
                    f"{where}: {key} has {len(values)} values for {n} input_ids; give one per token, as the "
                    "processor does."
                )
            else:
                _check_ids(values, where, key)
            per_token.setdefault(key, {})[index] = values
    for key, given in per_token.items():
        if key != "labels" and len(given) != len(samples):
            missing = [i for i in range(len(samples)) if i not in given]
            raise MalformedBatchError(
                f"{key} is given for some samples and not for others (not for sample {missing[0]}); give it for "
                "all or none (run one processor, with the same settings, on every sample)."
            )
    _same_device({key: list(given.items()) for key, given in per_token.items()} | others)
    batch: dict[str, Any] = {}
    for key, given in per_token.items():
        if key != "labels":
            batch[key] = torch.cat([given[i] for i in range(len(samples))])[None]
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    labels = [per_token.get("labels", {}).get(i, per_token["input_ids"][i]) for i in range(len(samples))]
    batch["labels"] = torch.cat([label.to(torch.int64) for label in labels])[None]
    batch["labels"][0, starts] = IGNORE_INDEX
    for key, values in others.items():
        batch[key] = _merge(key, values, len(samples))
    batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths])[None]
    if flash_attn_kwargs:
        cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
        batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
        batch["max_length_q"] = batch["max_length_k"] = max(lengths)
    return batch


def _same_device(keys: dict[str, list[tuple[int, Any]]]) -> None:
    seen: dict[torch.device, tuple[int, str]] = {}
    for key, values in keys.items():
        for index, value in values:
            if isinstance(value, torch.Tensor):
                seen.setdefault(value.device, (index, key))
    if len(seen) > 1:
        (a, (i, k)), (b, (j, m)) = list(seen.items())[:2]
        raise MalformedBatchError(
            f"sample {i}'s {k} is on {a} but sample {j}'s {m} on {b}; put every sample on one device before packing."
        )


def _as_tensor(value: Any, where: str, key: str) -> torch.Tensor:
    """A list, tuple, array or number given where other samples give a tensor, as a tensor."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        if _is_array(value):
            return torch.as_tensor(value)
        if isinstance(value, (list, tuple)) and value and all(_is_tensor_like(v) for v in value):
            return torch.stack([_as_tensor(v, where, key) for v in value])
        return torch.tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise MalformedBatchError(
            f"{where}: {key} is a {type(value).__name__} that does not convert to a tensor ({err}), while other "
            "samples give a tensor; give a tensor for every sample (return_tensors='pt'), or a list for every sample."
        ) from None


def _merge(key: str, values: list[tuple[int, Any]], count: int) -> Any:
    """One key's values over the samples that give it (see pack_multimodal: tensors, lists, shared values)."""
    if any(_is_tensor_like(v) for _, v in values):
        tensors = [(i, _as_tensor(v, f"sample {i}", key)) for i, v in values]
        kinds = {}
        for i, t in tensors:
            kinds.setdefault(_kind(t), i)
        if len(kinds) > 1:
            (a, i), (b, j) = list(kinds.items())[:2]
            raise MalformedBatchError(
                f"{key} is {a} in sample {i} but {b} in sample {j}; give every sample's {key} as the processor "
                "makes it (one dtype kind for all)."
            )
        if key.endswith("_grid_thw"):
            for i, t in tensors:
                if _kind(t) != "int" or t.ndim != 2 or t.shape[1] != 3 or bool((t < 1).any()):
                    raise MalformedBatchError(
                        f"sample {i}: {key} is a {t.dtype} tensor of shape {tuple(t.shape)}; give one integer row "
                        "(t, h, w) of positive patch counts per image or video, shape (k, 3), as the processor does."
                    )
        return _cat_padded(key, tensors)
    if all(isinstance(v, (list, tuple)) for _, v in values):
        return [x for _, v in values for x in v]
    (first_index, first), mismatch = values[0], None
    if len(values) != count:
        missing = next(i for i in range(count) if i not in dict(values))
        mismatch = f"sample {first_index} gives {first!r} but sample {missing} does not give it"
    for i, v in values[1:]:
        try:
            same = type(v) is type(first) and bool(v == first)
        except Exception:
            same = False
        if not same and mismatch is None:
            mismatch = f"sample {i} gives {v!r} where sample {first_index} gives {first!r}"
    if mismatch:
        raise MalformedBatchError(
            f"{key} is neither a tensor nor a list, so the packed row shares one value of it, but {mismatch}; "
            "pack samples that agree on it, or drop the key."
        )
    return first


def _cat_padded(key: str, tensors: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """Concatenate along dim 0, zero-padding every later dimension to the largest."""
    ndims = {}
    for i, t in tensors:
        ndims.setdefault(t.ndim, (i, tuple(t.shape)))
    if len(ndims) != 1:
        (_, (i, a)), (_, (j, b)) = list(ndims.items())[:2]
        raise MalformedBatchError(
            f"{key} has shape {a} in sample {i} but {b} in sample {j}: not the same number of dimensions; "
            "give every sample's vision inputs as one processor makes them (return_tensors='pt', one sample per call)."
        )
    first = tensors[0][1]
    if first.ndim == 0:
        return torch.stack([t for _, t in tensors])
    sizes = [max(t.shape[d] for _, t in tensors) for d in range(1, first.ndim)]
    padded = []
    for _, t in tensors:
        pad: list[int] = []
        for d in reversed(range(1, t.ndim)):
            pad += [0, sizes[d - 1] - t.shape[d]]
        padded.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return torch.cat(padded, dim=0)
