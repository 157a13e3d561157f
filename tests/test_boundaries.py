import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hf_varlen_patch import Boundaries, MalformedBoundariesError


def test_from_position_ids_single_row():
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1]])
    b = Boundaries.from_position_ids(pos)
    assert b.cu_seqlens.tolist() == [0, 5, 8, 10]
    assert b.cu_seqlens.dtype == torch.int32
    assert b.max_seqlen == 5
    assert b.seq_idx.tolist() == [0] * 5 + [1] * 3 + [2] * 2
    assert b.is_packed and b.num_sequences == 3 and b.total_tokens == 10
    assert torch.equal(b.position_ids(), pos)
    assert b.sequence_starts().tolist() == [0, 5, 8]


def test_rows_never_merge_even_when_positions_continue():
    pos = torch.tensor([[0, 1, 2], [3, 4, 5]])
    b = Boundaries.from_position_ids(pos)
    assert b.cu_seqlens.tolist() == [0, 3, 6]
    assert not b.is_packed  # one sequence per row


def test_a_jump_that_is_not_a_restart_still_starts_a_sequence():
    b = Boundaries.from_position_ids(torch.tensor([[0, 1, 2, 7, 8]]))
    assert b.cu_seqlens.tolist() == [0, 3, 5]


def test_broadcast_positions_over_batch():
    pos = torch.tensor([[0, 1, 0, 1, 2]])
    b = Boundaries.from_position_ids(pos, shape=(2, 5))
    assert b.cu_seqlens.tolist() == [0, 2, 5, 7, 10]


def test_trailing_padding_is_its_own_sequence():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    b = Boundaries.from_position_ids(pos, attention_mask=mask)
    assert b.cu_seqlens.tolist() == [0, 3, 5, 6, 7, 8]
    # padding whose positions keep counting is split off by the mask
    pos2 = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    b2 = Boundaries.from_position_ids(pos2, attention_mask=mask)
    assert b2.cu_seqlens.tolist() == [0, 3, 5, 8]


def test_single_sequence_with_padding_is_not_packed():
    pos = torch.tensor([[0, 1, 2, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    assert not Boundaries.from_position_ids(pos, attention_mask=mask).is_packed
    left = torch.tensor([[0, 0, 1, 0, 1, 2]])  # left padding as generate() builds it
    left_mask = torch.tensor([[0, 0, 0, 1, 1, 1]])
    assert not Boundaries.from_position_ids(left, attention_mask=left_mask).is_packed


@pytest.mark.parametrize(
    "pos, kwargs, match",
    [
        (torch.tensor([[0.0, 1.0, 2.0]]), {}, "integer"),
        (torch.tensor([[0, 1, -1]]), {}, "negative"),
        (torch.tensor([[[0, 1, 2]]]), {}, "shape"),
        (torch.tensor([[0, 1, 2]]), {"shape": (1, 4)}, "input_ids"),
        (torch.tensor([[0, 1], [0, 1], [0, 1]]), {"shape": (2, 2)}, "input_ids"),
        (torch.tensor([[0, 1, 2]]), {"attention_mask": torch.ones(1, 2)}, "attention_mask"),
        # a real token after padding that continues its sequence: a hole inside a sequence
        (torch.tensor([[0, 1, 2, 3, 0, 1]]), {"attention_mask": torch.tensor([[1, 1, 0, 1, 1, 1]])}, "inside"),
    ],
)
def test_malformed_position_ids(pos, kwargs, match):
    with pytest.raises(MalformedBoundariesError, match=match):
        Boundaries.from_position_ids(pos, **kwargs)


def test_from_cu_seqlens():
    cu = torch.tensor([0, 3, 5, 8], dtype=torch.int32)
    b = Boundaries.from_cu_seqlens(cu, 3, shape=(1, 8))
    assert b.seq_idx.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert b.position_ids().tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert b.max_seqlen == 3 and b.cu_seqlens.tolist() == [0, 3, 5, 8]


@pytest.mark.parametrize(
    "cu, max_len, shape, match",
    [
        ([0, 3, 3, 8], 5, (1, 8), "strictly increasing"),
        ([0, 5, 3, 8], 5, (1, 8), "strictly increasing"),
        ([0, 3, 6], 3, (1, 8), "ends at 6"),
        ([1, 3, 8], 5, (1, 8), "start at 0"),
        ([0, 3, 8], 5, (2, 4), "crosses a row"),
        ([0, 3, 8], 2, (1, 8), "max_length"),
    ],
)
def test_malformed_cu_seqlens(cu, max_len, shape, match):
    with pytest.raises(MalformedBoundariesError, match=match):
        Boundaries.from_cu_seqlens(torch.tensor(cu, dtype=torch.int32), max_len, shape=shape)


def test_cu_seqlens_type_errors():
    with pytest.raises(MalformedBoundariesError, match="integers"):
        Boundaries.from_cu_seqlens(torch.tensor([0.0, 4.0]), 4, shape=(1, 4))
    with pytest.raises(MalformedBoundariesError, match="1-D"):
        Boundaries.from_cu_seqlens(torch.tensor([[0, 4]]), 4, shape=(1, 4))


@given(st.lists(st.lists(st.integers(1, 20), min_size=1, max_size=6), min_size=1, max_size=4))
def test_position_ids_round_trip(rows):
    width = max(sum(r) for r in rows)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    expected = []
    for i, row in enumerate(rows):
        start = 0
        for n in row:
            pos[i, start : start + n] = torch.arange(n)
            mask[i, start : start + n] = 1
            expected.append((i * width + start, n))
            start += n
        if start < width:
            pos[i, start:] = torch.arange(width - start)  # padding counts on: one run
            expected.append((i * width + start, width - start))
    b = Boundaries.from_position_ids(pos, attention_mask=mask)
    starts = b.cu_seqlens.tolist()
    assert [(s, e - s) for s, e in zip(starts[:-1], starts[1:])] == expected
    assert b.max_seqlen == max(n for _, n in expected)
    assert b.is_packed == any(len(r) > 1 for r in rows)
    real = mask.bool()
    assert torch.equal(b.position_ids()[real], pos[real])
    cu_b = Boundaries.from_cu_seqlens(b.cu_seqlens, b.max_seqlen, shape=tuple(pos.shape))
    assert torch.equal(cu_b.seq_idx, b.seq_idx)


def test_what_recurrent_layers_need():
    """seq_idx per token, cu_seqlens, the start mask and one row per sequence, from one forward's boundaries."""
    b = Boundaries.from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]))
    assert b.seq_idx_rows().tolist() == [[0, 0, 0, 1, 1, 2], [3, 3, 3, 3, 4, 4]]
    assert b.start_mask().tolist() == [
        [True, False, False, True, False, True],
        [True, False, False, False, True, False],
    ]
    index, valid = b.sequence_rows()
    assert index.shape == (5, 4) and valid.sum(1).tolist() == [3, 2, 1, 4, 2]
    assert index[valid].tolist() == list(range(12))
