"""pack_into_bins and PackingCollator: bins are valid, deterministic and as TRL's; the collated batch
describes every boundary (positions, labels, cu_seq_lens, seq_idx, padding as a sequence of its own);
a patched model on it equals every example run alone, an unpatched one visibly does not; and a
Trainer run with the collator matches a padded run step for step."""

import math

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
from hf_varlen_patch.packing import IGNORE_INDEX, STRATEGIES, PackingCollator, SampleTooLongError, pack_into_bins
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
    with pytest.raises(ValueError):
        pack_into_bins([1, 2], **{"max_tokens": 4, **kwargs})
    with pytest.raises(ValueError):
        PackingCollator(**{"max_tokens": 4, **kwargs})
    with pytest.raises(ValueError, match="negative"):
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
    with pytest.raises(ValueError, match="1-D"):
        collate([{"input_ids": torch.tensor([[1, 2]])}])
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
