"""pack_into_bins and PackingCollator: bins are valid, deterministic and as TRL's; the collated batch
describes every boundary (positions, labels, cu_seq_lens, seq_idx, padding as a sequence of its own);
a patched model on it equals every example run alone, an unpatched one visibly does not; and a
Trainer run with the collator matches a padded run step for step."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

# the Trainer set-up every training-stack test shares (same examples, same order, plain SGD)
from test_training import max_diff, padded_collator, params, train
from torch.utils.data import Dataset

import hf_varlen_patch
from hf_varlen_patch import Boundaries, VarlenPatchError
from hf_varlen_patch.errors import MalformedBatchError
from hf_varlen_patch.packing import (
    IGNORE_INDEX,
    STRATEGIES,
    PackingCollator,
    SampleTooLongError,
    pack_into_bins,
    pack_multimodal,
)
from hf_varlen_patch.testing import tiny_model

TOL = 1e-5
MODEL_TYPES = ("llama", "gpt2", "qwen3_next")  # qwen3_next: a hybrid (gated delta rule + attention) on both lines
OPTIONS = {
    "positions": {},
    "flash_kwargs": {"return_flash_attn_kwargs": True},
    "seq_idx": {"return_seq_idx": True},
    "flash_kwargs_and_seq_idx": {"return_flash_attn_kwargs": True, "return_seq_idx": True},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread is fastest, and immune to a busy machine (where
    spinning OpenMP threads slow tiny matmuls a hundredfold). Restored after this module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ bin packing


def next_fit(sizes, capacity):
    """Rows next-fit uses over ``sizes`` in the given order (a row is closed once something misses it)."""
    rows, room = 0, -1
    for size in sizes:
        if size > room:
            rows, room = rows + 1, capacity
        room -= size
    return rows


def naive_fit(lengths, capacity, strategy):
    """pack_into_bins' documented rules, the slow way: longest first (ties: lower index), into the
    first open row it fits (ffd) or the fullest one (bfd; ties: the row that got that full first)."""
    rows, room, since = [], [], []
    for step, i in enumerate(sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))):
        fits = [r for r in range(len(rows)) if room[r] >= lengths[i]]
        if not fits:
            rows.append([])
            room.append(capacity)
            since.append(step)
            fits = [len(rows) - 1]
        r = fits[0] if strategy == "ffd" else min(fits, key=lambda r: (room[r], since[r]))
        rows[r].append(i)
        room[r] -= lengths[i]
        since[r] = step
    return rows


def instances(min_length=0):
    """(lengths, max_tokens) with every length within max_tokens."""
    return st.integers(1, 48).flatmap(
        lambda cap: st.tuples(st.lists(st.integers(min_length, cap), max_size=40), st.just(cap))
    )


@given(instances(), st.sampled_from(STRATEGIES))
def test_bins_hold_every_index_once_within_capacity(instance, strategy):
    lengths, cap = instance
    rows = pack_into_bins(lengths, cap, strategy)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(row and sum(lengths[i] for i in row) <= cap for row in rows)
    assert len(rows) >= math.ceil(sum(lengths) / cap)
    # any-fit never opens more rows than next-fit over the same (decreasing) order
    assert len(rows) <= next_fit(sorted(lengths, reverse=True), cap)
    assert rows == pack_into_bins(list(lengths), cap, strategy) == pack_into_bins(tuple(lengths), cap, strategy)
    assert rows == naive_fit(lengths, cap, strategy)


def test_bins_can_beat_and_lose_to_next_fit_in_arrival_order():
    """Why the bound above is next-fit over the *decreasing* order: next-fit in arrival order can be
    lucky (4 full rows here, the optimum) where first-fit decreasing needs 5; on most inputs decreasing
    fits win (12 rows where next-fit needs 20)."""
    lengths, cap = [5, 9, 3, 15, 6, 4, 6, 9, 8], 17
    assert next_fit(lengths, cap) == 4 and len(pack_into_bins(lengths, cap, "ffd")) == 5
    alternating = [9, 2] * 10
    assert next_fit(alternating, 10) == 20 and len(pack_into_bins(alternating, 10, "bfd")) == 12


def test_ties_go_by_index():
    assert pack_into_bins([2, 2, 2, 2], 4) == [[0, 1], [2, 3]]
    assert pack_into_bins([1, 3, 1, 3], 4, "bfd") == [[1, 0], [3, 2]]
    assert pack_into_bins([], 4) == []


def test_bfd_places_where_it_fits_best():
    # rows [7] (1 left), [5] (3 left), [4] (4 left): 3 goes to the 3-room row, not the first one it fits
    assert pack_into_bins([3, 5, 2, 7, 1, 4], 8, "bfd") == [[3, 4], [1, 0], [5, 2]]
    assert pack_into_bins([3, 5, 2, 7, 1, 4], 8, "ffd") == [[3, 4], [1, 0], [5, 2]]
    assert pack_into_bins([6, 5, 2], 8, "ffd") == [[0, 2], [1]]
    assert pack_into_bins([6, 5, 3, 2], 9, "ffd") == [[0, 2], [1, 3]]
    assert pack_into_bins([6, 5, 3, 2], 9, "bfd") == [[0, 2], [1, 3]]
    assert pack_into_bins([5, 4, 2], 7, "ffd") == [[0, 2], [1]]
    assert pack_into_bins([6, 4, 3, 1], 7, "ffd") == [[0, 3], [1, 2]]


@given(instances(min_length=1))
def test_bfd_equals_trl_pack_dataset(instance):
    """The same rows, in the same order, as TRL's pack_dataset(strategy="bfd") (which drops empty samples)."""
    import datasets  # the test extras install both (pyproject [train])
    import trl.data_utils as trl_data_utils

    lengths, cap = instance
    if not lengths:
        return
    datasets.disable_progress_bars()
    dataset = datasets.Dataset.from_dict({"input_ids": [[i] * n for i, n in enumerate(lengths)]})
    packed = trl_data_utils.pack_dataset(dataset, cap, strategy="bfd")
    trl_rows = []
    for ids, seq_lengths in zip(packed["input_ids"], packed["seq_lengths"]):
        starts = [sum(seq_lengths[:k]) for k in range(len(seq_lengths))]
        trl_rows.append([ids[s] for s in starts])
    assert pack_into_bins(lengths, cap, "bfd") == trl_rows


def test_too_long_sample_names_index_length_and_fix():
    with pytest.raises(SampleTooLongError) as caught:
        pack_into_bins([3, 8, 9, 2], 8, "bfd")
    err = caught.value
    assert isinstance(err, ValueError) and isinstance(err, VarlenPatchError)
    assert (err.index, err.length, err.max_tokens) == (2, 9, 8)
    message = str(err)
    for part in ("sample 2", "9 tokens", "max_tokens=8", "raise max_tokens", "truncate"):
        assert part in message, message


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_truncate_counts_a_long_sample_as_max_tokens(strategy):
    assert pack_into_bins([3, 20, 5], 8, strategy, truncate=True) == [[1], [2, 0]]


@pytest.mark.parametrize("kwargs", [{"strategy": "nfd"}, {"max_tokens": 0}, {"max_tokens": 2.5}])
def test_bad_arguments_raise(kwargs):
    with pytest.raises(MalformedBatchError):
        pack_into_bins([1, 2], **{"max_tokens": 4, **kwargs})
    with pytest.raises(MalformedBatchError):
        PackingCollator(**{"max_tokens": 4, **kwargs})
    with pytest.raises(MalformedBatchError, match="negative"):
        pack_into_bins([1, -2], 4)


# ------------------------------------------------------------------ the collator


HAND_FEATURES = [
    {"input_ids": [1, 2, 3]},
    {"input_ids": [4, 5, 6, 7, 8]},
    {"input_ids": [1, 2], "labels": [-100, 7]},  # a masked prompt token
    {"input_ids": [3] * 7},
]


def test_collator_on_a_hand_example():
    collate = PackingCollator(max_tokens=8, pad_token_id=9, return_flash_attn_kwargs=True, return_seq_idx=True)
    assert collate.layout(HAND_FEATURES) == [[3], [1, 0], [2]]
    batch = collate(HAND_FEATURES)
    assert set(batch) == {"input_ids", "position_ids", "labels", "seq_idx", *("cu_seq_lens_q", "cu_seq_lens_k")} | {
        "max_length_q",
        "max_length_k",
    }
    expected = {
        "input_ids": [[3, 3, 3, 3, 3, 3, 3, 9], [4, 5, 6, 7, 8, 1, 2, 3], [1, 2, 9, 9, 9, 9, 9, 9]],
        "position_ids": [[0, 1, 2, 3, 4, 5, 6, 0], [0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]],
        "labels": [
            [-100, 3, 3, 3, 3, 3, 3, -100],
            [-100, 5, 6, 7, 8, -100, 2, 3],
            [-100, 7, -100, -100, -100, -100, -100, -100],
        ],
        "seq_idx": [[0, 0, 0, 0, 0, 0, 0, 1], [2, 2, 2, 2, 2, 3, 3, 3], [4, 4, 5, 5, 5, 5, 5, 5]],
        "cu_seq_lens_q": [0, 7, 8, 13, 16, 18, 24],
        "cu_seq_lens_k": [0, 7, 8, 13, 16, 18, 24],
    }
    for key, value in expected.items():
        dtype = torch.int32 if key.startswith(("cu_", "seq_idx")) else torch.int64
        assert torch.equal(batch[key], torch.tensor(value, dtype=dtype)), key
    assert batch["max_length_q"] == batch["max_length_k"] == 7
    assert type(batch["max_length_q"]) is int
    assert batch["cu_seq_lens_q"] is batch["cu_seq_lens_k"]  # as DataCollatorWithFlattening: no q/k check needed


def test_collator_takes_tensors_and_pads_to_a_multiple():
    as_lists = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9]}]
    as_tensors = [{k: torch.tensor(v) for k, v in f.items()} for f in as_lists]
    collate = PackingCollator(max_tokens=6, pad_to_multiple_of=4, return_flash_attn_kwargs=True)
    batch = collate(as_tensors)
    assert {k: v.tolist() if torch.is_tensor(v) else v for k, v in batch.items()} == {
        "input_ids": [[5, 6, 7, 8, 9, 0, 0, 0]],
        "position_ids": [[0, 1, 2, 0, 1, 0, 1, 2]],
        "labels": [[-100, 6, 7, -100, 9, -100, -100, -100]],
        "cu_seq_lens_q": [0, 3, 5, 8],
        "cu_seq_lens_k": [0, 3, 5, 8],
        "max_length_q": 3,
        "max_length_k": 3,
    }
    listed = collate(as_lists)
    assert all(torch.equal(listed[k], batch[k]) if torch.is_tensor(batch[k]) else listed[k] == batch[k] for k in batch)
    # static shapes: every batch (max_tokens wide) whatever its examples
    assert PackingCollator(max_tokens=6, pad_to_multiple_of=6)(as_lists)["input_ids"].shape == (1, 6)


def test_one_row_equals_data_collator_with_flattening():
    """What transformers' collator gives for one row, key for key (examples longest first, so both
    keep them in the same order)."""
    from transformers import DataCollatorWithFlattening

    # without labels: DataCollatorWithFlattening reads labels only if the first example has them
    features = sorted(({"input_ids": f["input_ids"]} for f in HAND_FEATURES), key=lambda f: -len(f["input_ids"]))
    ours = PackingCollator(max_tokens=64, return_flash_attn_kwargs=True, return_seq_idx=True)(features)
    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True)(features)
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert (
            (torch.equal(ours[key], value) and ours[key].dtype == value.dtype)
            if torch.is_tensor(value)
            else (ours[key] == value)
        ), key


@given(
    st.lists(st.integers(0, 20), min_size=1, max_size=12).filter(any),
    st.integers(20, 40),
    st.sampled_from(STRATEGIES),
    st.sampled_from([None, 1, 8, 16]),
)
def test_collated_boundaries_agree_everywhere(lengths, max_tokens, strategy, multiple):
    """Each row holds its examples back to back; positions, cu_seq_lens and seq_idx describe the same
    sequences as the engine reads them (padding one more sequence per row); the target count is the
    same unshifted (transformers 4.x Trainer) and shifted (5.x)."""
    gen = torch.Generator().manual_seed(len(lengths))
    features = [{"input_ids": torch.randint(1, 50, (n,), generator=gen)} for n in lengths]
    collate = PackingCollator(
        max_tokens=max_tokens,
        strategy=strategy,
        pad_to_multiple_of=multiple,
        pad_token_id=0,
        return_flash_attn_kwargs=True,
        return_seq_idx=True,
    )
    batch, layout = collate(features), collate.layout(features)
    assert layout == [[[i for i, n in enumerate(lengths) if n][j] for j in row] for row in pack_into_bins(
        [n for n in lengths if n], max_tokens, strategy
    )]  # fmt: skip
    rows, width = batch["input_ids"].shape
    assert rows == len(layout) and width <= -(-max_tokens // (multiple or 1)) * (multiple or 1)
    for r, row in enumerate(layout):
        tokens = torch.cat([features[i]["input_ids"] for i in row])
        assert torch.equal(batch["input_ids"][r, : len(tokens)], tokens)
        assert not batch["input_ids"][r, len(tokens) :].any()
    labels = batch["labels"]
    targets = sum(max(n - 1, 0) for n in lengths)
    assert int((labels != IGNORE_INDEX).sum()) == int((labels[:, 1:] != IGNORE_INDEX).sum()) == targets
    from_positions = Boundaries.from_position_ids(batch["position_ids"])
    assert torch.equal(from_positions.cu_seqlens, batch["cu_seq_lens_q"])
    assert from_positions.max_seqlen == batch["max_length_q"]
    from_cu = Boundaries.from_cu_seqlens(batch["cu_seq_lens_q"], batch["max_length_q"], shape=(rows, width))
    assert torch.equal(from_cu.seq_idx_rows(), batch["seq_idx"])
    assert torch.equal(from_cu.position_ids(), batch["position_ids"])
    starts = from_cu.start_mask()
    assert (labels[starts] == IGNORE_INDEX).all()


def test_collator_refuses_what_it_cannot_pack():
    collate = PackingCollator(max_tokens=4)
    with pytest.raises(SampleTooLongError, match="sample 1 has 5 tokens"):
        collate([{"input_ids": [1]}, {"input_ids": [1, 2, 3, 4, 5]}])
    with pytest.raises(ValueError, match="padding"):
        collate([{"input_ids": [1, 2, 0], "attention_mask": [1, 1, 0]}])
    with pytest.raises(ValueError, match="batch of 2 sequences"):
        collate([{"input_ids": torch.tensor([[1, 2], [3, 4]])}])
    with pytest.raises(ValueError, match="labels"):
        collate([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="empty"):
        collate([{"input_ids": []}])
    # empty examples are dropped, an all-ones mask is fine
    assert collate([{"input_ids": []}, {"input_ids": [7, 8], "attention_mask": [1, 1]}])["input_ids"].tolist() == [
        [7, 8]
    ]


def test_collator_truncates_when_asked():
    collate = PackingCollator(max_tokens=4, truncate=True)
    batch = collate([{"input_ids": [1, 2, 3, 4, 5, 6], "labels": [-100, -100, 3, 4, 5, 6]}, {"input_ids": [7, 8]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [7, 8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 3, 4], [-100, 8, -100, -100]]


# ------------------------------------------------------------------ bad input: typed errors, valid input in any form

# how a tokenized column can reach a collator: python lists (datasets' default), tuples, the batch of one a
# tokenizer returns with return_tensors, tensors and numpy arrays of any integer dtype (datasets' "torch"/"numpy"
# formats, TRL, a user's own Dataset)
RENDERINGS = ("list", "tuple", "nested", "tensor", "tensor_row", "numpy", "numpy_row")
INT_DTYPES = ("int64", "int32", "int16", "int8")


def render(values, how, dtype="int64"):
    if how == "list":
        return list(values)
    if how == "tuple":
        return tuple(values)
    if how == "nested":
        return [list(values)]
    if how.startswith("tensor"):
        tensor = torch.tensor(values, dtype=getattr(torch, dtype))
        return tensor[None] if how == "tensor_row" else tensor
    array = np.array(values, dtype=dtype)
    return array[None] if how == "numpy_row" else array


@st.composite
def valid_features(draw, min_examples=1):
    """Examples (each as plain lists too) with labels, an all-ones mask, position_ids 0..n-1 and TRL's
    seq_lengths [n] where drawn, every value rendered in any accepted form."""
    plain, rendered = [], []
    for _ in range(draw(st.integers(min_examples, 6))):
        n = draw(st.integers(0, 10))
        ids = draw(st.lists(st.integers(0, 120), min_size=n, max_size=n))
        example = {"input_ids": ids}
        if draw(st.booleans()):
            example["labels"] = [draw(st.sampled_from([IGNORE_INDEX, i])) for i in ids]
        shown = {key: render(v, draw(st.sampled_from(RENDERINGS)), draw(st.sampled_from(INT_DTYPES)))
                 for key, v in example.items()}  # fmt: skip
        if draw(st.booleans()):
            shown["attention_mask"] = draw(
                st.sampled_from([[1] * n, torch.ones(n, dtype=torch.bool), torch.ones(1, n), np.ones(n, dtype=np.int8)])
            )
        if draw(st.booleans()):
            shown["position_ids"] = render(range(n), draw(st.sampled_from(RENDERINGS)))
        if draw(st.booleans()):
            shown["seq_lengths"] = [n]
        if draw(st.booleans()):
            shown["text"] = "other keys are ignored"
        plain.append(example)
        rendered.append(shown)
    return plain, rendered


def assert_same_batch(ours, theirs):
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        if torch.is_tensor(value):
            assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
        else:
            assert ours[key] == value, key


@given(valid_features(), st.sampled_from(STRATEGIES), st.sampled_from([None, 4]))
def test_any_valid_form_packs_as_the_plain_lists_and_as_each_example_alone(features, strategy, multiple):
    """Lists, tuples, (1, n) batches of one, tensors and arrays of any integer dtype, masks of ones,
    positions 0..n-1: the same batch as plain python lists, and every row holds its examples as they
    are alone (their ids; their labels with -100 at the start)."""
    plain, rendered = features
    if not any(e["input_ids"] for e in plain):
        return
    collate = PackingCollator(max_tokens=12, strategy=strategy, pad_to_multiple_of=multiple,
                              return_flash_attn_kwargs=True, return_seq_idx=True)  # fmt: skip
    batch = collate(rendered)
    assert collate.layout(rendered) == collate.layout(plain)
    assert_same_batch(batch, collate(plain))
    for r, row in enumerate(collate.layout(plain)):
        ids = [t for i in row for t in plain[i]["input_ids"]]
        labels = [t for i in row for t in [IGNORE_INDEX, *plain[i].get("labels", plain[i]["input_ids"])[1:]]]
        assert batch["input_ids"][r, : len(ids)].tolist() == ids
        assert batch["labels"][r, : len(ids)].tolist() == labels
        assert (batch["labels"][r, len(ids) :] == IGNORE_INDEX).all()


def _set(key, value):
    return lambda example: {**example, key: value(example) if callable(value) else value}


def _ids(example):
    return list(example["input_ids"])


# (what goes wrong, how to make it from a valid example of >= 2 tokens, the key the message names, a fragment)
BAD_EXAMPLES = {
    "float ids": (_set("input_ids", lambda e: [i + 0.7 for i in _ids(e)]), "input_ids", "float"),
    "whole float ids": (_set("input_ids", lambda e: torch.tensor(_ids(e), dtype=torch.float32)), "input_ids", "float"),
    "float numpy ids": (_set("input_ids", lambda e: np.array(_ids(e), dtype=np.float64)), "input_ids", "float"),
    "bool ids": (_set("input_ids", lambda e: [True] + _ids(e)[1:]), "input_ids", "bools"),
    "bool tensor ids": (_set("input_ids", lambda e: torch.ones(len(_ids(e)), dtype=torch.bool)), "input_ids", "bool"),
    "complex ids": (_set("input_ids", lambda e: torch.tensor(_ids(e)) + 0j), "input_ids", "complex"),
    "negative id": (_set("input_ids", lambda e: [-3] + _ids(e)[1:]), "input_ids", "negative"),
    "-100 in input_ids": (_set("input_ids", lambda e: [IGNORE_INDEX] + _ids(e)[1:]), "input_ids", "labels"),
    "ragged nested ids": (_set("input_ids", lambda e: [_ids(e), [1]]), "input_ids", "flat list"),
    "nested list ids": (_set("input_ids", lambda e: [[i] for i in _ids(e)]), "input_ids", "shape"),
    "batch of 2": (_set("input_ids", lambda e: torch.tensor([_ids(e)] * 2)), "input_ids", "batch of 2"),
    "3-D ids": (_set("input_ids", lambda e: torch.tensor([[_ids(e)]])), "input_ids", "1-D"),
    "0-d ids": (_set("input_ids", torch.tensor(5)), "input_ids", "single value"),
    "int ids": (_set("input_ids", 5), "input_ids", "type int"),
    "string ids": (_set("input_ids", "hello"), "input_ids", "type str"),
    "None in ids": (_set("input_ids", lambda e: [None] + _ids(e)[1:]), "input_ids", "flat list"),
    "object array": (_set("input_ids", lambda e: np.array(["a", *_ids(e)[1:]], dtype=object)), "input_ids", "array"),
    "huge id": (_set("input_ids", lambda e: [2**70] + _ids(e)[1:]), "input_ids", "int64"),
    "no input_ids": (lambda e: {"labels": e["input_ids"]}, "input_ids", "no input_ids"),
    "short labels": (_set("labels", lambda e: _ids(e)[1:]), "labels", "labels"),
    "float labels": (_set("labels", lambda e: [float(i) for i in _ids(e)]), "labels", "float"),
    "labels -1": (_set("labels", lambda e: [-1] + _ids(e)[1:]), "labels", "-100"),
    "labels of a batch": (_set("labels", lambda e: torch.tensor([_ids(e)] * 3)), "labels", "batch of 3"),
    "a class label": (_set("labels", 1), "labels", "type int"),
    "padding": (_set("attention_mask", lambda e: [1] * (len(_ids(e)) - 1) + [0]), "attention_mask", "padding"),
    "mask of twos": (_set("attention_mask", lambda e: [2] * len(_ids(e))), "attention_mask", "0 and 1"),
    "short mask": (_set("attention_mask", [1]), "attention_mask", "attention_mask of 1"),
    "packed positions": (_set("position_ids", lambda e: [0] * len(_ids(e))), "position_ids", "already packed"),
    "offset positions": (_set("position_ids", lambda e: list(range(3, 3 + len(_ids(e))))), "position_ids", "0, 1"),
    "float positions": (_set("position_ids", lambda e: [i / 1 for i in range(len(_ids(e)))]), "position_ids", "float"),
    "packed seq_lengths": (_set("seq_lengths", lambda e: [1, len(_ids(e)) - 1]), "seq_lengths", "already packed"),
    "seq_lengths off": (_set("seq_lengths", [9]), "seq_lengths", "add up"),
    "images": (_set("pixel_values", torch.zeros(1, 3, 4, 4)), "pixel_values", "pack_multimodal"),
    "image grid": (_set("image_grid_thw", torch.tensor([[1, 2, 2]])), "image_grid_thw", "pack_multimodal"),
    "a collated batch": (_set("cu_seq_lens_q", torch.tensor([0, 2], dtype=torch.int32)), "cu_seq_lens_q", "collated"),
    "not a mapping": (lambda e: _ids(e), None, "not a mapping"),
}  # fmt: skip


@given(valid_features(min_examples=2), st.data())
def test_every_bad_example_is_refused_naming_it_and_its_key(features, data):
    """One corrupted example among valid ones (in any form): a MalformedBatchError that names the
    example and the key, from the collator and from its layout alike."""
    _, rendered = features
    index = data.draw(st.integers(0, len(rendered) - 1))
    rendered[index] = {"input_ids": [5, 6, 7]}
    name = data.draw(st.sampled_from(sorted(BAD_EXAMPLES)))
    corrupt, key, fragment = BAD_EXAMPLES[name]
    rendered[index] = corrupt(rendered[index])
    collate = PackingCollator(max_tokens=12)
    for run in (collate, collate.layout):
        with pytest.raises(MalformedBatchError) as caught:
            run(rendered)
        message = str(caught.value)
        assert f"example {index}" in message and fragment in message, (name, message)
        assert key is None or key in message, (name, message)


@pytest.mark.parametrize("name", sorted(BAD_EXAMPLES))
def test_bad_example_alone_is_refused(name):
    """Each corruption on its own, so a failure names it (the property above draws among them)."""
    corrupt, key, fragment = BAD_EXAMPLES[name]
    with pytest.raises(MalformedBatchError, match=re.escape(fragment)) as caught:
        PackingCollator(max_tokens=12)([{"input_ids": [1, 2]}, corrupt({"input_ids": [5, 6, 7]})])
    assert "example 1" in str(caught.value) and (key is None or key in str(caught.value))


@pytest.mark.parametrize(
    "features, fragment",
    [
        ({"input_ids": [[1, 2], [3]]}, "one mapping"),  # a batch of columns, not a list of examples
        ("input_ids", "got a str"),
        (None, "got a NoneType"),
        ([], "no examples"),
        ([{"input_ids": []}, {"input_ids": torch.zeros(0, dtype=torch.long)}], "every example is empty"),
    ],
)
def test_collator_refuses_what_is_not_a_list_of_examples(features, fragment):
    with pytest.raises(MalformedBatchError, match=fragment):
        PackingCollator(max_tokens=4)(features)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"pad_to_multiple_of": 2.5}, "pad_to_multiple_of must be an int >= 1 or None, got 2.5"),
        ({"pad_to_multiple_of": 0}, "pad_to_multiple_of"),
        ({"pad_to_multiple_of": True}, "pad_to_multiple_of"),
        ({"pad_token_id": 1.5}, "pad_token_id must be an int >= 0, got 1.5"),
        ({"pad_token_id": -1}, "pad_token_id"),
        ({"pad_token_id": "0"}, "pad_token_id"),
        ({"pad_token_id": True}, "pad_token_id"),
        ({"max_tokens": True}, "max_tokens must be a positive int"),
        ({"max_tokens": "8"}, "max_tokens"),
        ({"max_tokens": np.float64(8)}, "max_tokens"),
        ({"strategy": ["ffd"]}, "unknown packing strategy"),
        ({"truncate": "no"}, "truncate must be True or False"),
        ({"return_flash_attn_kwargs": 2}, "return_flash_attn_kwargs must be True or False"),
        ({"return_seq_idx": "yes"}, "return_seq_idx"),
    ],
)
def test_collator_refuses_bad_settings_when_built_and_when_changed(kwargs, fragment):
    with pytest.raises(MalformedBatchError, match=re.escape(fragment)):
        PackingCollator(**{"max_tokens": 8, **kwargs})
    collate = PackingCollator(max_tokens=8)
    for name, value in kwargs.items():  # the fields stay writable: checked at every call
        setattr(collate, name, value)
    with pytest.raises(MalformedBatchError, match=re.escape(fragment)):
        collate([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5, 6, 7, 8, 9]}])


def test_collator_takes_any_int_settings_and_no_pad_token():
    """numpy / 0-d tensor ints, 0/1 for flags; pad_token_id=None (a tokenizer without a pad token) pads with 0."""
    features = [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}]
    plain = PackingCollator(max_tokens=4, pad_token_id=0, pad_to_multiple_of=4, return_seq_idx=True)
    odd = PackingCollator(max_tokens=np.int64(4), pad_token_id=None, pad_to_multiple_of=torch.tensor(4),
                          return_seq_idx=1)  # fmt: skip
    assert_same_batch(odd(features), plain(features))
    assert (odd.max_tokens, odd.pad_token_id, odd.pad_to_multiple_of, odd.return_seq_idx) == (4, 0, 4, True)
    assert type(odd.max_tokens) is int and type(odd.pad_to_multiple_of) is int


@pytest.mark.parametrize(
    "lengths, kwargs, fragment",
    [
        ([3, 2.5], {}, "sample 1 has length 2.5"),
        ([3, True], {}, "sample 1 has length True"),
        ([3, "2"], {}, "sample 1 has length '2'"),
        (torch.tensor([3.0, 2.0]), {}, "sample 0 has length"),
        ([3, -1], {}, "sample 1 has a negative length"),
        (7, {}, "got a int"),
        ("37", {}, "got a str"),
        ({3: 1}, {}, "got a dict"),
        ([3], {"truncate": "yes"}, "truncate must be True or False"),
    ],
)
def test_pack_into_bins_refuses_what_is_not_a_list_of_lengths(lengths, kwargs, fragment):
    with pytest.raises(MalformedBatchError, match=re.escape(fragment)):
        pack_into_bins(lengths, 4, **kwargs)


def test_pack_into_bins_takes_integer_lengths_of_any_kind():
    expected = pack_into_bins([3, 2, 4], 5)
    assert pack_into_bins(torch.tensor([3, 2, 4]), 5) == expected
    assert pack_into_bins(np.array([3, 2, 4], dtype=np.int16), np.int32(5)) == expected
    assert pack_into_bins((n for n in (3, 2, 4)), 5) == expected


def test_errors_are_typed():
    assert issubclass(MalformedBatchError, VarlenPatchError) and issubclass(MalformedBatchError, ValueError)
    assert issubclass(SampleTooLongError, MalformedBatchError)


def test_trl_packed_rows_are_refused_not_merged():
    """Rows TRL already packed (pack_dataset: seq_lengths; its position_ids restart): this collator
    would number each as one sequence, so it refuses them; the same rows unpacked are fine."""
    import datasets
    import trl.data_utils as trl_data_utils

    datasets.disable_progress_bars()
    dataset = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]]})
    packed = trl_data_utils.pack_dataset(dataset, 6, strategy="bfd")
    rows = [packed[i] for i in range(len(packed))]
    assert any(len(row["seq_lengths"]) > 1 for row in rows)
    collate = PackingCollator(max_tokens=8)
    with pytest.raises(MalformedBatchError, match="already packed"):
        collate(rows)
    with pytest.raises(MalformedBatchError, match="already packed"):  # positions from TRL's own collator
        collate([{"input_ids": [1, 2, 3, 4, 5], "position_ids": [0, 1, 2, 0, 1]}])
    unpacked = collate([dataset[i] for i in range(3)])["input_ids"]
    assert unpacked.tolist() == [[6, 7, 8, 9, 1, 2, 3], [4, 5, 0, 0, 0, 0, 0]]


# ---- pack_multimodal


def _vision_sample(n_images, n_text, seed):
    """A processor-like sample: Qwen-VL style patches (rows of 6 features) and an image grid per image."""
    gen = torch.Generator().manual_seed(seed)
    grids = [[1, 2, 1 + int(torch.randint(2, (1,), generator=gen))] for _ in range(n_images)]
    patches = sum(t * h * w for t, h, w in grids)
    sample = {"input_ids": torch.randint(1, 50, (1, n_text + patches), generator=gen),
              "mm_token_type_ids": torch.zeros(1, n_text + patches, dtype=torch.long)}  # fmt: skip
    if n_images:
        sample["pixel_values"] = torch.randn(patches, 6, generator=gen)
        sample["image_grid_thw"] = torch.tensor(grids)
    return sample


def render_sample(sample, draw):
    """The sample with each value as a tensor, a numpy array or a (nested) list."""
    shown = {}
    for key, value in sample.items():
        how = draw(st.sampled_from(["tensor", "numpy", "list"]))
        shown[key] = value if how == "tensor" else value.numpy() if how == "numpy" else value.tolist()
    return shown


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 5)), min_size=1, max_size=4), st.data())
def test_pack_multimodal_takes_lists_arrays_and_tensors_mixed(layouts, data):
    """Each key as a tensor in some samples and a list or an array in others: the row the all-tensor
    samples give (lists in every sample stay a concatenated list), which is every sample alone, back
    to back; never only the first sample's value."""
    samples = [_vision_sample(k, n, seed) for seed, (k, n) in enumerate(layouts)]
    shown = [render_sample(s, data.draw) for s in samples]
    ours, theirs = pack_multimodal(shown), pack_multimodal(samples)
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        mine = ours[key]
        if isinstance(mine, list):
            assert all(isinstance(s.get(key, []), list) for s in shown), key
            mine = torch.tensor(mine, dtype=value.dtype)
        assert torch.equal(torch.as_tensor(mine), value) if torch.is_tensor(value) else mine == value, key
    assert torch.equal(theirs["input_ids"][0], torch.cat([s["input_ids"][0] for s in samples]))
    with_images = [s for s in samples if "pixel_values" in s]
    for key in ("pixel_values", "image_grid_thw"):
        if with_images:
            assert torch.equal(theirs[key], torch.cat([s[key] for s in with_images])), key
    starts = torch.tensor([0, *[s["input_ids"].shape[1] for s in samples]]).cumsum(0)[:-1]
    assert (theirs["labels"][0, starts] == IGNORE_INDEX).all()
    assert theirs["labels"].dtype == torch.int64


def test_pack_multimodal_never_keeps_only_the_first_value():
    a, b = _vision_sample(1, 3, 0), _vision_sample(2, 2, 1)
    batch = pack_multimodal(
        [a, {**b, "pixel_values": b["pixel_values"].tolist(), "image_grid_thw": b["image_grid_thw"].numpy()}]
    )
    assert batch["pixel_values"].shape[0] == a["pixel_values"].shape[0] + b["pixel_values"].shape[0]
    assert batch["image_grid_thw"].tolist() == a["image_grid_thw"].tolist() + b["image_grid_thw"].tolist()
    b_first = pack_multimodal(
        [{**a, "pixel_values": [row.numpy() for row in a["pixel_values"]]}, b]
    )  # a list of arrays
    assert torch.equal(b_first["pixel_values"], batch["pixel_values"])
    assert pack_multimodal([{**a, "do_resize": True}, {**b, "do_resize": True}])["do_resize"] is True


def _mm(first=None, **changes):
    """Two valid samples, then sample 1 changed (a value of None drops the key)."""
    a, b = _vision_sample(1, 3, 0), _vision_sample(1, 2, 1)
    b = {k: v for k, v in {**b, **changes}.items() if v is not None}
    return [{**a, **(first or {})}, b]


def _long(*values):
    return torch.tensor(values, dtype=torch.long)


# (samples whose sample 1 is bad, what the message says besides "sample 1")
BAD_SAMPLES = {
    "float ids": (_mm(input_ids=torch.tensor([[1.5, 2.0, 3.0, 4.0, 5.0, 6.0]])), ("input_ids", "float")),
    "bool ids": (_mm(input_ids=[[True, 2, 3, 4, 5, 6]]), ("input_ids", "bools")),
    "1-D ids": (_mm(input_ids=torch.arange(1, 7)), ("input_ids", "(1, n)")),
    "batch of 2": (_mm(input_ids=torch.ones(2, 6, dtype=torch.long)), ("input_ids", "(2, 6)")),
    "empty": (_mm(input_ids=_long([]), mm_token_type_ids=None), ("no tokens",)),
    "negative ids": (_mm(input_ids=_long([1, 2, -3, 4, 5, 6])), ("input_ids", "negative")),
    "labels too short": (_mm(labels=_long([1, 2, 3, 4, 5])), ("labels", "6 input_ids")),
    "labels -7": (_mm(labels=_long([1, 2, -7, 4, 5, 6])), ("labels", "-100")),
    "float labels": (_mm(labels=torch.ones(1, 6)), ("labels", "float")),
    "type ids missing": (_mm(mm_token_type_ids=None), ("mm_token_type_ids", "some samples")),
    "type ids too long": (_mm(mm_token_type_ids=_long([0] * 7)), ("mm_token_type_ids", "7 values")),
    "negative type ids": (_mm(mm_token_type_ids=_long([-1] * 6)), ("mm_token_type_ids", "negative")),
    "padding (list mask)": (_mm(attention_mask=[[1, 1, 1, 1, 1, 0]]), ("padding",)),
    "restarting positions": (_mm(position_ids=_long([0, 1, 2, 0, 1, 2])), ("position_ids", "packed")),
    "float grid": (_mm(image_grid_thw=torch.tensor([[1.0, 2.0, 2.0]])), ("image_grid_thw", "float")),
    "1-D grid": (_mm(image_grid_thw=torch.tensor([1, 2, 2])), ("image_grid_thw", "(k, 3)")),
    "zero grid": (_mm(image_grid_thw=_long([1, 0, 2])), ("image_grid_thw", "positive")),
    "pixel dims": (_mm(pixel_values=torch.zeros(1, 4, 6)), ("pixel_values", "dimensions")),
    "uint8 pixels": (_mm(pixel_values=torch.zeros(4, 6, dtype=torch.uint8)), ("pixel_values", "float in sample 0")),
    "ragged pixel list": (_mm(pixel_values=[[0.0] * 6, [0.0]]), ("pixel_values", "does not convert")),
    "disagreeing flag": (_mm({"do_resize": True}, do_resize=False), ("do_resize", "sample 0")),
    "flag in one only": (_mm(do_resize=False), ("do_resize", "sample 0 does not give it")),
    "collated keys": (_mm(cu_seq_lens_q=torch.tensor([0, 6], dtype=torch.int32)), ("cu_seq_lens_q", "collated")),
    "no input_ids": (_mm(input_ids=None), ("no input_ids",)),
}


@pytest.mark.parametrize("name", sorted(BAD_SAMPLES))
def test_pack_multimodal_refuses_bad_samples_naming_sample_and_key(name):
    samples, fragments = BAD_SAMPLES[name]
    with pytest.raises(MalformedBatchError) as caught:
        pack_multimodal(samples)
    message = str(caught.value)
    assert all(part in message for part in ("sample 1", *fragments)), message


@pytest.mark.parametrize(
    "samples, kwargs, fragment",
    [
        ({"input_ids": torch.ones(1, 3, dtype=torch.long)}, {}, "one mapping"),
        ([], {}, "at least one sample"),
        ([torch.ones(1, 3, dtype=torch.long)], {}, "sample 0 is a Tensor, not a mapping"),
        ([{"input_ids": torch.ones(1, 3, dtype=torch.long)}], {"flash_attn_kwargs": "yes"}, "flash_attn_kwargs"),
    ],
)
def test_pack_multimodal_refuses_what_is_not_a_list_of_samples(samples, kwargs, fragment):
    with pytest.raises(MalformedBatchError, match=re.escape(fragment)):
        pack_multimodal(samples, **kwargs)


def test_pack_multimodal_fills_labels_a_sample_does_not_give():
    """labels default to input_ids per sample, as in the collator (with -100 at every start)."""
    a, b = _vision_sample(0, 3, 0), _vision_sample(0, 4, 1)
    given = pack_multimodal([{**a, "labels": torch.tensor([[-100, -100, 7]])}, b])
    assert given["labels"].tolist() == [[-100, -100, 7, -100, *b["input_ids"][0, 1:].tolist()]]
    assert pack_multimodal([{**a, "labels": None}, b])["labels"].tolist() == pack_multimodal([a, b])["labels"].tolist()


# ------------------------------------------------------------------ packed == each example alone

LENGTHS = [13, 7, 22, 5, 9, 16]  # ffd into 32: rows [22, 9], [16, 13], [7, 5]; all padded to 32


def _features(vocab_size):
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, vocab_size, (n,), generator=gen)} for n in LENGTHS]


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def _alone(model, features):
    """Every example on its own (no cache): its logits, and the gradients of the summed token loss."""
    model.zero_grad(set_to_none=True)
    logits = []
    for feature in features:
        ids = feature["input_ids"]
        out = model(input_ids=ids[None], use_cache=False).logits[0]
        F.cross_entropy(out[:-1], ids[1:], reduction="sum").backward()
        logits.append(out.detach())
    return logits, _grads(model)


def _packed(model, features, collate):
    """The collated batch as Trainer runs it (the model's default use_cache): per-example logits
    cut back out of the rows, gradients of the same summed loss, and the model's own mean loss."""
    batch = collate(features)
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    logits, loss = [None] * len(features), 0.0
    for r, row in enumerate(collate.layout(features)):
        start = 0
        for i in row:
            ids = features[i]["input_ids"]
            piece = out.logits[r, start : start + len(ids)]
            loss = loss + F.cross_entropy(piece[:-1], ids[1:], reduction="sum")
            logits[i], start = piece.detach(), start + len(ids)
    loss.backward()
    return logits, _grads(model), out.loss.item(), loss.item() / sum(n - 1 for n in LENGTHS)


def _max_errors(alone, packed):
    logits = max(float((a - b).abs().max()) for a, b in zip(alone[0], packed[0]))
    grads = max(float((g - packed[1].get(k, torch.zeros_like(g))).abs().max()) for k, g in alone[1].items())
    return logits, grads


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_patched_model_on_collated_batch_equals_each_example_alone(model_type, option):
    model = tiny_model(model_type).train()
    hf_varlen_patch.apply(model)
    collate = PackingCollator(max_tokens=32, pad_to_multiple_of=8, **OPTIONS[option])
    features = _features(model.config.vocab_size)
    layout = collate.layout(features)
    assert len(layout) == 3 and all(sum(LENGTHS[i] for i in row) < 32 for row in layout)  # several rows, all padded
    packed = _packed(model, features, collate)
    logits_err, grads_err = _max_errors(_alone(model, features), packed)
    assert logits_err <= TOL and grads_err <= TOL, (logits_err, grads_err)
    assert abs(packed[2] - packed[3]) <= TOL  # the model's loss on the collator's labels: mean over real targets


@pytest.mark.parametrize("model_type", ["gpt2", "qwen3_next"])
def test_unpatched_model_visibly_leaks_on_collated_batch(model_type):
    """The same check on an unpatched model fails by far: the test sees leaks across sequences."""
    model = tiny_model(model_type).train()
    collate = PackingCollator(max_tokens=32, pad_to_multiple_of=8)
    features = _features(model.config.vocab_size)
    logits_err, grads_err = _max_errors(_alone(model, features), _packed(model, features, collate))
    assert logits_err > 1e-3 and grads_err > 1e-3, (logits_err, grads_err)


# ------------------------------------------------------------------ Trainer


class _Examples(Dataset):
    def __init__(self, sequences):
        self.sequences = sequences

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, i):
        return {"input_ids": self.sequences[i]}


def test_trainer_with_packing_collator_matches_padded_training(tmp_path):
    gen = torch.Generator().manual_seed(1)
    sequences = [
        torch.randint(1, 128, (int(n),), generator=gen).tolist() for n in torch.randint(3, 24, (12,), generator=gen)
    ]
    collate = PackingCollator(max_tokens=32)
    assert any(len(collate.layout([{"input_ids": s} for s in sequences[i : i + 4]])) < 4 for i in (0, 4, 8))
    data = _Examples(sequences)
    packed = train(hf_varlen_patch.apply(tiny_model("llama")), collate, tmp_path, data=data)
    padded = train(tiny_model("llama"), padded_collator, tmp_path, data=data)
    assert max_diff(padded, params(tiny_model("llama"))) > 1e-3  # the runs trained
    assert max_diff(packed, padded) <= 1e-6
