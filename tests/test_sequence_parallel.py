"""Sequence parallel (Ulysses) over the packed token stream, on the CPU with gloo.

``scripts/sequence_parallel_equivalence.py`` runs under torchrun with 2, 3 and 4 processes: every
rank holds one slice of a packed row of 55 tokens (five sequences; no degree here divides it, and
3 divides neither the tiny models' query heads nor their key/value heads), and the logits
gathered from the ranks, the loss summed over them and the gradients summed over them must equal
one process running the whole row after ``apply`` (float32). The naive split (each rank its own
slice, nothing exchanged) is measured in the same run: the check sees what sequence parallel
fixes. Types: dense (llama, qwen2), sliding window (mistral), softcap + window (gemma2), sinks
(gpt_oss), ALiBi (bloom), learned positions and own attention (gpt2), bidirectional attention
within each sequence (bert), and hybrids whose recurrent
ops run on the gathered stream: gated delta rule + convolution (qwen3_next), Mamba-2 SSD (bamba),
RG-LRU with position resets (recurrent_gemma). Refused, with a typed error: a family whose layers
read a slice's own offsets (roberta's positions, rwkv's recurrence) and a decoder whose loss is
computed inline over the slice (bart).

Vision-language batches with images (``--images``, degrees 2 and 3): the mRoPE family's tiny
twins (qwen2_vl, qwen2_5_vl; on 5.x also qwen3_vl, qwen3_vl_moe, glm4v, qwen3_5, qwen3_5_moe) with
text, images and a video packed by ``pack_multimodal``; an image's placeholder tokens straddle two
ranks at both degrees. Logits, loss and every gradient (the vision tower's included) equal one
process; llava, whose image features have no sequence-parallel cut, is refused.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_varlen_patch
from hf_varlen_patch import MalformedBatchError, StalePatchError
from hf_varlen_patch.packing import PackingCollator
from hf_varlen_patch.testing import tiny_model

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "sequence_parallel_equivalence.py"
EXACT = ["llama", "qwen2", "mistral", "gemma2", "gpt_oss", "bloom", "gpt2", "bert", "qwen3_next", "bamba",
         "recurrent_gemma"]  # fmt: skip
#: type -> the typed error it is refused with
REFUSED = {
    "roberta": "UnsupportedArchitectureError",
    "rwkv": "UnsupportedArchitectureError",
    "bart": "MalformedBatchError",
}
TOL = 1e-5
#: vision-language types whose batches with images shard (where the release has and patches them)
EXACT_IMAGES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "qwen3_5", "qwen3_5_moe"]


def _on_this_release(model_type: str) -> bool:
    """The type exists in this transformers release and its entry patches it here."""
    from transformers import CONFIG_MAPPING

    from hf_varlen_patch.testing import tiny_config

    return model_type in CONFIG_MAPPING and not hf_varlen_patch.lookup(model_type).refusal(tiny_config(model_type))


def _launch(degree: int, types: list[str], *extra: str) -> dict[str, dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(degree),
           str(SCRIPT), *types, *extra]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {row["model_type"]: row for row in rows}


@pytest.mark.parametrize(
    "degree, attention, layout",
    # auto: Ulysses where the degree divides the query heads (2, 4: the tiny models have 4), else
    # all_gather_kv (3); then each form where auto would not take it: Ulysses with padded heads,
    # and gathered keys at a degree that divides the heads, on zigzag slices (two chunks per rank)
    [
        (2, "auto", "contiguous"),
        (3, "auto", "contiguous"),
        (4, "auto", "contiguous"),
        (3, "ulysses", "contiguous"),
        (4, "all_gather_kv", "zigzag"),
        (2, "ulysses", "zigzag"),
    ],  # fmt: skip
)
def test_sequence_parallel_equals_one_process(degree, attention, layout):
    exact = [t for t in EXACT if _on_this_release(t)]
    assert {"llama", "gemma2", "bloom", "qwen3_next"} <= set(exact)
    results = _launch(degree, exact + list(REFUSED), "--attention", attention, "--layout", layout)
    for model_type in exact:
        row = results[model_type]
        assert "error" not in row, row
        assert (row["degree"], row["attention"], row["layout"]) == (degree, attention, layout)
        assert max(row["logits"], row["loss"], row["grads"], row["eval_loss"]) <= TOL, row
        assert row["naive"] > 1e-3, row  # the naive split attends within its own slice (100x the tolerance)
    for model_type, error in REFUSED.items():
        row = results[model_type]
        assert row.get("error") == error, row
        assert "sequence parallel" in row["message"], row


def test_every_registered_type_is_exact_or_refused_under_sequence_parallel():
    """The whole registry at degree 3, gathered keys on zigzag slices (the form with the most
    moving parts): each type equals one process or raises a typed error; none differs, none
    crashes (a crash on one rank hangs the others)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3", str(SCRIPT),
           "--all", "--attention", "all_gather_kv", "--layout", "zigzag"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    summary = [line for line in done.stdout.splitlines() if line.startswith("# ")][-1]
    differs = [r for r in rows if "error" not in r and max(r["logits"], r["loss"], r["grads"]) > TOL]
    crashed = [r for r in rows if "error" in r and not r["typed"]]
    assert not differs and not crashed, (differs, crashed)
    assert sum("error" not in r for r in rows) >= 80, summary  # 4.57: 81 of 103; 5.25: 138 of 161


@pytest.mark.parametrize("option", ["--lora", "--checkpointing"])
def test_sequence_parallel_under_lora_and_checkpointing(option):
    """PEFT LoRA adapters on every linear layer (their summed gradients), and non-reentrant
    checkpointing (every layer recomputed in the backward, its all-to-alls and gathers included):
    still one process's loss and gradients."""
    types = [t for t in ("llama", "qwen3_next", "bamba") if _on_this_release(t)]
    results = _launch(2, types, option)
    for model_type in types:
        row = results[model_type]
        assert "error" not in row, row
        assert max(row["logits"], row["loss"], row["grads"]) <= TOL, row


@pytest.mark.parametrize("degree, layout", [(2, "contiguous"), (3, "contiguous"), (3, "zigzag")])
def test_sequence_parallel_with_images_equals_one_process(degree, layout):
    """mRoPE positions of the whole stream, each rank the feature rows of its own placeholders
    (of both its chunks, on zigzag slices)."""
    exact = [t for t in EXACT_IMAGES if _on_this_release(t)]
    assert {"qwen2_vl", "qwen2_5_vl"} <= set(exact)
    results = _launch(degree, [*exact, "llava"], "--images", "--layout", layout)
    for model_type in exact:
        row = results[model_type]
        assert "error" not in row, row
        assert row["degree"] == degree and row["images"] >= 3, row
        assert max(row["logits"], row["loss"], row["grads"], row["eval_loss"], row["vision_grads"]) <= TOL, row
        assert row["naive"] > 1e-2, row
    if layout == "contiguous":
        assert results["qwen2_5_vl"]["split_images"] >= 1  # an image on two ranks
    refused = results["llava"]
    assert refused.get("error") == "UnsupportedArchitectureError", refused
    assert "sequence parallel" in refused["message"], refused


def test_shard_packed_batch_slices_type_ids_and_hands_vision_inputs_whole():
    pixels, grid = torch.randn(8, 12), torch.tensor([[1, 2, 4]])
    batch = {
        "input_ids": torch.tensor([[1, 2, 9, 9, 3, 4, 5]]),
        "mm_token_type_ids": torch.tensor([[0, 0, 1, 1, 0, 0, 0]]),
        "position_ids": torch.tensor([[0, 1, 2, 3, 4, 0, 1]]),
        "pixel_values": pixels,
        "image_grid_thw": grid,
    }
    shards = [hf_varlen_patch.shard_packed_batch(batch, rank=r, world_size=2) for r in range(2)]
    assert [s["mm_token_type_ids"].tolist() for s in shards] == [[[0, 0, 1, 1]], [[0, 0, 0, 0]]]  # padded with text
    assert all(s["pixel_values"] is pixels and s["image_grid_thw"] is grid for s in shards)
    with pytest.raises(MalformedBatchError, match=r"does not know how to split \['image_sizes'\]"):
        hf_varlen_patch.shard_packed_batch({**batch, "image_sizes": torch.tensor([[4, 4]])}, rank=0, world_size=2)
    with pytest.raises(MalformedBatchError, match="one value per token"):
        hf_varlen_patch.shard_packed_batch({**batch, "mm_token_type_ids": torch.zeros(1, 3)}, rank=0, world_size=2)


def test_shard_packed_batch_splits_the_stream_and_shifts_labels_globally():
    ids = torch.arange(1, 12)[None]  # sequences of 4, 5, 2 tokens; degree 3 pads to 12
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1]])
    shards = [
        hf_varlen_patch.shard_packed_batch({"input_ids": ids, "position_ids": positions}, rank=r, world_size=3)
        for r in range(3)
    ]
    assert [s["input_ids"].tolist() for s in shards] == [[[1, 2, 3, 4]], [[5, 6, 7, 8]], [[9, 10, 11, 0]]]
    assert [s["position_ids"].tolist() for s in shards] == [[[0, 1, 2, 3]], [[0, 1, 2, 3]], [[4, 0, 1, 0]]]
    # the next token of the same sequence; -100 at every sequence end and on the padding
    assert torch.cat([s["shift_labels"] for s in shards], 1).tolist() == [
        [2, 3, 4, -100, 6, 7, 8, 9, -100, 11, -100, -100]
    ]
    assert all(s["num_items_in_batch"] == 8 for s in shards)
    assert shards[0]["cu_seq_lens_q"].tolist() == [0, 4, 9, 11, 12]


def test_zigzag_slices_hold_chunks_r_and_2p_minus_1_minus_r():
    ids = torch.arange(1, 12)[None]  # 11 tokens; degree 2 zigzag pads to a multiple of 4: 12
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 1]])
    shards = [
        hf_varlen_patch.shard_packed_batch(
            {"input_ids": ids, "position_ids": positions}, rank=r, world_size=2, layout="zigzag"
        )
        for r in range(2)
    ]
    assert [s["input_ids"].tolist() for s in shards] == [[[1, 2, 3, 10, 11, 0]], [[4, 5, 6, 7, 8, 9]]]
    assert [s["position_ids"].tolist() for s in shards] == [[[0, 1, 2, 0, 1, 0]], [[3, 0, 1, 2, 3, 4]]]
    assert [s["shift_labels"].tolist() for s in shards] == [[[2, 3, 4, 11, -100, -100]], [[-100, 6, 7, 8, 9, -100]]]
    assert all(s["sequence_parallel_layout"] == "zigzag" for s in shards)
    assert "sequence_parallel_layout" not in hf_varlen_patch.shard_packed_batch(
        {"input_ids": ids, "position_ids": positions}, rank=0, world_size=2
    )
    with pytest.raises(MalformedBatchError, match="layout must be one of"):
        hf_varlen_patch.shard_packed_batch({"input_ids": ids, "position_ids": positions}, rank=0, world_size=2,
                                           layout="ring")  # fmt: skip


def test_rows_of_a_packed_batch_shard_as_one_stream():
    """PackingCollator's rows (each padded at its end) are one stream: sharding them equals
    sharding their concatenation, and the rows' padding stays a sequence without targets."""
    collator = PackingCollator(max_tokens=8)
    examples = [{"input_ids": list(range(1, n + 1))} for n in (5, 6, 3, 2)]
    rows = collator(examples)
    assert rows["input_ids"].shape[0] > 1
    flat = {k: v.reshape(1, -1) for k, v in rows.items()}
    for rank in range(3):
        got = hf_varlen_patch.shard_packed_batch(rows, rank=rank, world_size=3)
        want = hf_varlen_patch.shard_packed_batch(flat, rank=rank, world_size=3)
        assert got.keys() == want.keys()
        for key in got:
            assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(want[key])), key
    assert got["num_items_in_batch"] == sum(n - 1 for n in (5, 6, 3, 2))


def test_sequence_parallel_refusals():
    with pytest.raises(ValueError, match="init_process_group"):
        hf_varlen_patch.apply(tiny_model("llama"), sequence_parallel=True)
    with pytest.raises(ValueError, match="do not combine"):
        hf_varlen_patch.apply(tiny_model("llama"), unpad=True, sequence_parallel=object())
    with pytest.raises(MalformedBatchError, match="input_ids of shape"):
        hf_varlen_patch.shard_packed_batch({"input_ids": torch.ones(5, dtype=torch.long)}, rank=0, world_size=2)
    with pytest.raises(MalformedBatchError, match="position_ids restarting"):
        hf_varlen_patch.shard_packed_batch({"input_ids": torch.ones(2, 5, dtype=torch.long)}, rank=0, world_size=2)
    with pytest.raises(MalformedBatchError, match="attention_mask with padding"):
        hf_varlen_patch.shard_packed_batch(
            {"input_ids": torch.ones(1, 4, dtype=torch.long), "position_ids": torch.arange(4)[None],
             "attention_mask": torch.tensor([[1, 1, 1, 0]])}, rank=0, world_size=2)  # fmt: skip
    with pytest.raises(ValueError, match="attention must be one of"):
        hf_varlen_patch.SequenceParallel(attention="ring")


@pytest.fixture
def group_of_one():
    """A gloo process group of this process alone (no launcher, no port)."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_sequence_parallel_refusals_with_a_group(group_of_one):
    with pytest.raises(TypeError, match="ProcessGroup"):
        hf_varlen_patch.apply(tiny_model("llama"), sequence_parallel=object())
    # a packed batch without the stream's offsets would attend within each rank's slice: refused
    model = hf_varlen_patch.apply(tiny_model("llama"), sequence_parallel=group_of_one)
    with pytest.raises(MalformedBatchError, match="shard_packed_batch"):
        model(input_ids=torch.ones(1, 6, dtype=torch.long), position_ids=torch.tensor([[0, 1, 2, 0, 1, 2]]))
    model(input_ids=torch.ones(1, 6, dtype=torch.long))  # unpacked calls run upstream's code
    # the same model with another attention form is patched again, not kept
    form = hf_varlen_patch.SequenceParallel(attention="all_gather_kv")
    assert hf_varlen_patch.apply(model, sequence_parallel=form) is model
    batch = hf_varlen_patch.shard_packed_batch(
        {"input_ids": torch.randint(1, 100, (1, 9)), "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2]])}
    )
    reference = hf_varlen_patch.apply(tiny_model("llama"))
    want = reference(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    assert torch.allclose(model(**batch).logits, want, atol=1e-5)


def test_switching_attention_after_apply_is_refused_under_sequence_parallel(group_of_one):
    model = hf_varlen_patch.apply(tiny_model("llama"), sequence_parallel=group_of_one)
    model.set_attn_implementation("eager")
    batch = hf_varlen_patch.shard_packed_batch(
        {"input_ids": torch.randint(1, 100, (1, 9)), "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 0, 1, 2]])}
    )
    with pytest.raises(StalePatchError, match="apply"):
        model(**batch)
