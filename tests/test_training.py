"""Training stacks after ``apply``: HF Trainer, TRL's SFTTrainer, PEFT LoRA, gradient
checkpointing and the loss, each against a padded run of the same examples in the same order.

Every check trains a few SGD steps in float32 on the CPU (no gradient clipping, so a loss scaled
differently would show) and compares the parameters, not only the losses. Reference numbers:
packed after ``apply`` == padded to <= 1.2e-7 here; the unpatched packed run of a model that
leaks differs by 1e-3 or more (``test_the_check_sees_a_leak``).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils.data import SequentialSampler

import hf_varlen_patch
from hf_varlen_patch.testing import compare_packed, make_packed_batch, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore")
os.environ.setdefault("WANDB_DISABLED", "true")


TOL = 1e-6  # parameters after 3 SGD steps at lr 0.1 (measured: <= 1.2e-7 equivalent, >= 1e-3 leaking)
VOCAB = 128


def examples(n: int = 12, seed: int = 0, *, mask_first: bool = False) -> list[dict]:
    """Tokenized samples of 3..19 tokens. ``mask_first`` adds labels with -100 on the first token,
    which is never a target anyway (see :func:`padded_collator`)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 20, (1,), generator=gen))
        ids = torch.randint(2, VOCAB, (length,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100, *ids[1:]]} if mask_first else {"input_ids": ids})
    return out


def padded_collator(features: list[dict]) -> dict:
    """Right padding, labels -100 on padding and on each row's first token.

    The first label of a row is never a target (the loss shifts it away), but transformers 4.57's
    Trainer counts ``num_items_in_batch`` as ``labels != -100`` before the shift, one token per row
    too many, so the padded run would normalise its loss differently from the packed run (whose
    collator masks every sequence start). Masking it makes the reference count the real targets
    on both lines (5.x counts shifted labels).
    """
    length = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _trainer_class():
    from transformers import Trainer

    class InOrder(Trainer):
        """Both runs see the same examples in the same order."""

        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    return InOrder


#: Three plain SGD steps: no clipping, no decay, no schedule, so any difference in the loss shows.
SGD = dict(
    per_device_train_batch_size=4,
    max_steps=3,
    learning_rate=0.1,
    optim="sgd",
    lr_scheduler_type="constant",
    max_grad_norm=0.0,
    weight_decay=0.0,
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    seed=0,
    disable_tqdm=True,
)


def sgd_args(output_dir, **overrides):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir), **{**SGD, "logging_steps": 1, "remove_unused_columns": False, **overrides}
    )


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def train(model, collator, tmp_path, data=None, **args) -> dict[str, torch.Tensor]:
    """Parameters after :data:`SGD` steps of HF Trainer over ``data`` (default :func:`examples`), in order."""
    trainer = _trainer_class()(
        model=model, args=sgd_args(tmp_path, **args), train_dataset=data or examples(), data_collator=collator
    )
    trainer.train()
    return params(trainer.model)


def fresh(model_type: str):
    return tiny_model(model_type)  # same seed, same weights every call


def flattening():
    from transformers import DataCollatorWithFlattening

    return DataCollatorWithFlattening()


# ------------------------------------------------------------------------------------ HF Trainer

#: dense generic, legacy (own attention), ALiBi, learned positions, MoE
TRAINER_TYPES = ["llama", "gpt2", "falcon", "opt", "bloom", "qwen2_moe"]


@pytest.mark.parametrize("accumulation", [1, 2], ids=["no_accumulation", "accumulate_2"])
@pytest.mark.parametrize("model_type", TRAINER_TYPES)
def test_trainer_flattening_matches_padded(model_type, accumulation, tmp_path):
    """Trainer + DataCollatorWithFlattening after apply == padded Trainer, also when Trainer
    normalises the loss over the accumulated micro-batches' token count (num_items_in_batch)."""
    start = params(fresh(model_type))
    padded = train(fresh(model_type), padded_collator, tmp_path, gradient_accumulation_steps=accumulation)
    packed = train(
        hf_varlen_patch.apply(fresh(model_type)), flattening(), tmp_path, gradient_accumulation_steps=accumulation
    )
    assert max_diff(padded, start) > 1e-3  # it trained
    assert max_diff(packed, padded) <= TOL


def test_the_check_sees_a_leak(tmp_path):
    """The same packed Trainer run without apply: OPT numbers positions from the mask, across the row."""
    padded = train(fresh("opt"), padded_collator, tmp_path)
    unpatched = train(fresh("opt"), flattening(), tmp_path)
    assert max_diff(unpatched, padded) > 1e-3


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("model_type", ["llama", "gpt_neo", "bloom", "falcon", "qwen3_next"])
def test_trainer_gradient_checkpointing(model_type, reentrant, tmp_path):
    """Trainer(gradient_checkpointing=True): recomputation keeps the boundaries (the engine
    reruns each checkpointed layer inside the packed forward's context), reentrant or not."""
    padded = train(fresh(model_type), padded_collator, tmp_path)
    packed = train(
        hf_varlen_patch.apply(fresh(model_type)),
        flattening(),
        tmp_path,
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": reentrant},
    )
    assert max_diff(packed, padded) <= TOL


# ------------------------------------------------------------------------------------------ loss


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "qwen2_moe", "qwen3_next"])
def test_sequence_mean_loss_is_the_mean_of_each_sequences_loss(model_type):
    """loss="sequence_mean": packed and padded batches give the mean of each sequence's own
    loss (and its gradients); the default token mean weighs long sequences more."""
    model = hf_varlen_patch.apply(fresh(model_type), loss="sequence_mean")
    batch = make_packed_batch([[5, 9, 3], [12, 7]], VOCAB, extra_padding=2, seed=3)
    model.zero_grad()
    separate = torch.stack([model(input_ids=s[None], labels=s[None], use_cache=False).loss for s in batch.sequences])
    separate.mean().backward()
    expected = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    packed = model(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=batch.attention_mask,
        labels=batch.labels,
        use_cache=False,
    ).loss
    packed.backward()
    assert abs(float(packed) - float(separate.mean())) <= 1e-5
    assert max(float((p.grad - expected[k]).abs().max()) for k, p in model.named_parameters() if k in expected) <= 1e-5
    rows = padded_collator([{"input_ids": s.tolist()} for s in batch.sequences])
    with torch.no_grad():
        padded = model(**rows, use_cache=False).loss
    assert abs(float(padded) - float(separate.mean())) <= 1e-5
    hf_varlen_patch.unapply(model)
    with torch.no_grad():
        token_mean = model(**rows, use_cache=False).loss
    assert abs(float(token_mean) - float(separate.mean())) > 1e-4  # the option changes something


@pytest.mark.parametrize("accumulation", [1, 2], ids=["no_accumulation", "accumulate_2"])
def test_trainer_sequence_mean_matches_padded(accumulation, tmp_path):
    """The per-sequence mean through Trainer: packed == padded, with gradient accumulation too
    (each micro-batch holds per_device_train_batch_size sequences; Trainer averages them)."""
    padded = train(
        hf_varlen_patch.apply(fresh("llama"), loss="sequence_mean"),
        padded_collator,
        tmp_path,
        gradient_accumulation_steps=accumulation,
    )
    packed = train(
        hf_varlen_patch.apply(fresh("llama"), loss="sequence_mean"),
        flattening(),
        tmp_path,
        gradient_accumulation_steps=accumulation,
    )
    token_mean = train(hf_varlen_patch.apply(fresh("llama")), flattening(), tmp_path)
    assert max_diff(packed, padded) <= TOL
    assert max_diff(packed, token_mean) > 1e-4


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
def test_sequence_mean_accumulation_is_the_mean_over_all_sequences(adapter, tmp_path):
    """Two micro-batches of 4 sequences accumulate to one batch of 8: Trainer averages the
    micro-batches' sequence means (the patched model says it takes no loss kwargs, also
    behind PEFT)."""

    def model():
        patched = hf_varlen_patch.apply(fresh("llama"), loss="sequence_mean")
        return lora(patched) if adapter else patched

    accumulated = train(model(), flattening(), tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    whole = train(model(), flattening(), tmp_path, per_device_train_batch_size=8)
    assert max_diff(accumulated, whole) <= TOL


def test_sequence_mean_refused_where_the_loss_is_inline():
    """A model whose loss the patch cannot replace says so instead of silently keeping the token mean."""
    model = fresh("bart")  # BartForCausalLM: labels not shifted, its own CrossEntropyLoss
    with pytest.raises(hf_varlen_patch.UnsupportedArchitectureError, match="sequence_mean"):
        hf_varlen_patch.apply(model, loss="sequence_mean")
    assert not hf_varlen_patch.is_patched(model)
    with pytest.raises(ValueError, match="loss must be one of"):
        hf_varlen_patch.apply(fresh("llama"), loss="mean")


# ------------------------------------------------------------------------------------------ PEFT


def lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))


@pytest.mark.parametrize("order", ["apply_then_peft", "peft_then_apply"])
def test_peft_lora_either_order(order, tmp_path):
    padded = train(lora(fresh("llama")), padded_collator, tmp_path)
    if order == "apply_then_peft":
        model = lora(hf_varlen_patch.apply(fresh("llama")))
    else:
        model = hf_varlen_patch.apply(lora(fresh("llama")))
    assert hf_varlen_patch.is_patched(model)
    packed = train(model, flattening(), tmp_path)
    assert max_diff(packed, padded) <= TOL


@pytest.mark.parametrize("model_type", ["llama", "falcon"])
def test_merge_and_unload_keeps_the_patch(model_type):
    """merge_and_unload returns the same transformers model with merged Linear layers: the patch
    (which lives on that model and its attention modules) stays, and packed == separate."""
    model = hf_varlen_patch.apply(lora(fresh(model_type)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a non-trivial adapter, so merging changes the weights
    merged = model.merge_and_unload().requires_grad_(True)  # PEFT froze the base weights
    assert hf_varlen_patch.is_patched(merged)
    batch = make_packed_batch([[5, 9, 3], [12, 7]], VOCAB, seed=2)
    assert compare_packed(merged, batch, use_cache=None).ok(1e-5)
    hf_varlen_patch.unapply(merged)
    assert not hf_varlen_patch.is_patched(merged)


# ------------------------------------------------------------------------------------------- TRL


def tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), pad_token="t0", eos_token="t1"
    )


def sft(model, tmp_path, *, peft: bool = False, bf16: bool = False, data=None, **config):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    kwargs = dict(
        SGD,
        output_dir=str(tmp_path),
        bf16=bf16,  # TRL's default is True: under CPU autocast padded and packed round differently
        max_length=None,
    )
    kwargs.update(config)
    if peft:
        from peft import LoraConfig

        config_peft = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**kwargs),
        train_dataset=Dataset.from_list(data or examples(mask_first=True)),
        processing_class=tokenizer(),
        peft_config=config_peft if peft else None,
    )
    trainer.train()
    return params(trainer.model)


#: dense, legacy (OPT: positions from the mask upstream), MoE
SFT_TYPES = ["llama", "opt", "qwen2_moe"]


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("model_type", SFT_TYPES)
def test_sft_padding_free_matches_padded(model_type, peft, tmp_path):
    """SFTTrainer(padding_free=True) after apply == the padded SFTTrainer run (float32)."""
    padded = sft(fresh(model_type), tmp_path, peft=peft)
    packed = sft(hf_varlen_patch.apply(fresh(model_type)), tmp_path, peft=peft, padding_free=True)
    assert max_diff(packed, padded) <= TOL


@pytest.mark.parametrize("model_type", SFT_TYPES)
def test_sft_bfd_packing_matches_padded(model_type, tmp_path):
    """packing="bfd" packs the whole dataset into rows of max_length tokens: with room for all of
    it, each epoch is one row of every sample, the padded run one batch of every sample."""
    data = examples(8, mask_first=True)
    total = sum(len(d["input_ids"]) for d in data)
    bfd = dict(data=data, packing=True, packing_strategy="bfd", max_length=total, per_device_train_batch_size=1)
    padded = sft(fresh(model_type), tmp_path, data=data, per_device_train_batch_size=len(data))
    packed = sft(hf_varlen_patch.apply(fresh(model_type)), tmp_path, **bfd)
    assert max_diff(packed, padded) <= TOL
    if model_type == "opt":  # upstream numbers OPT's positions across the packed row
        assert max_diff(sft(fresh(model_type), tmp_path, **bfd), padded) > 1e-3


def test_sft_bf16_difference_is_rounding(tmp_path):
    """TRL's default bf16=True (CPU autocast): packed and padded round differently, by less than
    bf16 itself moves the padded run away from float32. Reported TRL gaps of 1e-5..5e-4 were this."""
    reference = sft(fresh("llama"), tmp_path)
    padded = sft(fresh("llama"), tmp_path, bf16=True)
    packed = sft(hf_varlen_patch.apply(fresh("llama")), tmp_path, bf16=True, padding_free=True)
    noise = max_diff(padded, reference)
    assert 0 < max_diff(packed, padded) <= 2 * noise


# ----------------------------------------------------------------------- the users' one-line check


def test_assert_packing_equivalent_takes_a_model_a_config_a_type_or_a_directory(tmp_path):
    from hf_varlen_patch.testing import assert_packing_equivalent, tiny_config

    model = fresh("llama")
    result = assert_packing_equivalent(model)
    assert result.max_error <= 1e-5
    assert not hf_varlen_patch.is_patched(model)  # patched for the check only
    hf_varlen_patch.apply(model)
    assert_packing_equivalent(model)
    assert hf_varlen_patch.is_patched(model)  # a model patched by the user stays patched
    assert_packing_equivalent(tiny_config("falcon"))
    assert_packing_equivalent("gpt2")
    tiny_config("qwen3_next").save_pretrained(tmp_path)
    assert_packing_equivalent(str(tmp_path))


def test_assert_packing_equivalent_can_fail(monkeypatch):
    """Without the patch (apply made a no-op) the same call sees llama's leak under the default cache."""
    from hf_varlen_patch import api
    from hf_varlen_patch.testing import assert_packing_equivalent

    monkeypatch.setattr(api, "apply", lambda model, *a, **k: model)
    with pytest.raises(AssertionError, match="packed != separate"):
        assert_packing_equivalent(fresh("llama"))
    with pytest.raises(ValueError, match="tol="):
        assert_packing_equivalent(fresh("llama").to(torch.bfloat16))


def test_sft_refuses_sequence_mean_loudly(tmp_path):
    """TRL's fused LM head computes its own token mean over the base model: with
    loss="sequence_mean" that would silently be a different loss, so the base model refuses."""
    model = hf_varlen_patch.apply(fresh("llama"), loss="sequence_mean")
    with pytest.raises(hf_varlen_patch.UnsupportedArchitectureError, match="loss=.sequence_mean. would not apply"):
        sft(model, tmp_path, padding_free=True)
