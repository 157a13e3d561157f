"""TRL's preference and reward trainers on padded batches, with ``apply(model, unpad=True)``.

Each trainer builds its own padded batches (no packing collator); with ``unpad=True`` the model
runs their real tokens packed. Every check trains three plain SGD steps in float32 on the CPU (no
clipping) and compares the parameters with the same run on the unpatched model. Where TRL pads on
the right (DPO, reward) the unpatched run is each sequence alone, so the two must agree to float32
rounding; each check also asserts that the packed path really ran. Reference numbers: <= 3e-8
equal here, >= 1e-3 when the packed row leaks across sequences (``test_the_dpo_check_sees_a_leak``).
"""

from __future__ import annotations

import contextlib
import inspect
import os

import pytest
import torch
from test_training import SGD as TRAINING_SGD
from torch.utils.data import SequentialSampler

import hf_varlen_patch
from hf_varlen_patch import patching
from hf_varlen_patch.testing import tiny_model
from hf_varlen_patch.versions import TRANSFORMERS_4

pytestmark = pytest.mark.filterwarnings("ignore")
os.environ.setdefault("WANDB_DISABLED", "true")

TOL = 1e-6  # parameters after 3 SGD steps at lr 0.1 (measured: <= 3e-8 equal, >= 1e-3 leaking)
VOCAB = 128
#: dense (generic route), learned absolute positions (own attention), a gated-delta-rule hybrid
HYBRID = "qwen3_next" if TRANSFORMERS_4 else "qwen3_5_text"
TEXT_TYPES = ["llama", "qwen2", "gpt2", HYBRID]

#: test_training's three plain SGD steps (no clipping, no decay, no schedule), in float32 (TRL's
#: default is bf16 autocast), logging every step
SGD = {**TRAINING_SGD, "bf16": False, "logging_steps": 1}


def tokenizer():
    """A word-level tokenizer over ``t0 .. t127`` (t0 pads, t1 ends), no Hub needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="t0", eos_token="t1")


def words(gen: torch.Generator, low: int, high: int) -> str:
    n = int(torch.randint(low, high, (1,), generator=gen))
    return " ".join(f"t{int(i)}" for i in torch.randint(2, VOCAB, (n,), generator=gen))


def preference_data(n: int = 12, seed: int = 0):
    """Prompts of 2-8 words, chosen and rejected answers of 1-11: rows of very different lengths."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    rows = [
        {"prompt": words(gen, 2, 9), "chosen": " " + words(gen, 1, 12), "rejected": " " + words(gen, 1, 12)}
        for _ in range(n)
    ]
    return Dataset.from_list(rows)


def in_order(trainer):
    """Both runs see the same examples in the same order."""
    trainer._get_train_sampler = lambda *args, **kwargs: SequentialSampler(trainer.train_dataset)
    return trainer


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@contextlib.contextmanager
def unpadded_calls():
    """Counts the forwards that really ran packed through ``unpad`` (a plan was made)."""
    counted = {"plans": 0}
    original = patching.plan_unpadding

    def counting(call, **kwargs):
        plan = original(call, **kwargs)
        counted["plans"] += plan is not None
        return plan

    patching.plan_unpadding = counting
    try:
        yield counted
    finally:
        patching.plan_unpadding = original


def patched(model):
    return hf_varlen_patch.apply(model, unpad=True)


def lora_config(task_type: str | None = None):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type=task_type)


# ------------------------------------------------------------------------------------------- DPO


def train_trl(trainer: str, model, tmp_path, data, processing_class, **options) -> dict[str, torch.Tensor]:
    """Parameters after :data:`SGD` steps of ``trl.<trainer>Trainer`` over ``data``, in order.
    ``options``: the trainer's own arguments (``ref_model``, ``peft_config``, ``reward_funcs``, ...)
    and its config's (``precompute_ref_log_probs``, ``beta``, ...)."""
    import trl

    config_class, trainer_class = getattr(trl, f"{trainer}Config"), getattr(trl, f"{trainer}Trainer")
    own = set(inspect.signature(trainer_class).parameters)
    config = {"max_length": None, **{k: v for k, v in options.items() if k not in own}}  # no truncation
    args = config_class(output_dir=str(tmp_path), **{**SGD, **config})
    run = trainer_class(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=processing_class,
        **{k: v for k, v in options.items() if k in own},
    )
    in_order(run).train()
    return params(run.model)


def dpo(model, tmp_path, *, ref_model=None, peft=None, **config) -> dict[str, torch.Tensor]:
    return train_trl(
        "DPO", model, tmp_path, preference_data(), tokenizer(), ref_model=ref_model, peft_config=peft, **config
    )


#: how DPO gets its reference log-probs: a reference model, precomputed by the policy before
#: training (no reference model kept), or the LoRA policy with its adapter disabled
DPO_REFERENCES = ["ref_model", "precomputed", "lora"]


def dpo_run(model_type: str, reference: str, tmp_path, wrap=lambda m: m) -> dict[str, torch.Tensor]:
    if reference == "ref_model":
        return dpo(wrap(tiny_model(model_type)), tmp_path, ref_model=wrap(tiny_model(model_type)))
    if reference == "precomputed":
        return dpo(wrap(tiny_model(model_type)), tmp_path, precompute_ref_log_probs=True)
    return dpo(wrap(tiny_model(model_type)), tmp_path, peft=lora_config())


@pytest.mark.parametrize("reference", DPO_REFERENCES)
@pytest.mark.parametrize("model_type", TEXT_TYPES)
def test_dpo_unpad_matches_unpatched(model_type, reference, tmp_path):
    """DPOTrainer (sigmoid loss) with ``unpad=True`` == the unpatched run: TRL pads on the right,
    so the unpatched run is each sequence alone. The policy, its reference and TRL's fused
    log-prob head (which runs the base model itself) all run packed."""
    plain = dpo_run(model_type, reference, tmp_path)
    with unpadded_calls() as counted:
        packed = dpo_run(model_type, reference, tmp_path, wrap=patched)
    # per step: the policy, and the reference (precomputed: one pass per batch before training)
    assert counted["plans"] >= 6, counted
    assert max_diff(plain, packed) <= TOL


def test_the_dpo_check_sees_a_leak(tmp_path, monkeypatch):
    """The comparison above is sharp: with the packed row's boundaries dropped (every sequence of
    the row attends to the ones before it) the parameters move apart by far more than TOL."""
    original = patching.unpadded_call

    def one_sequence(call, plan):
        out = original(call, plan)
        whole = torch.tensor([0, plan.tokens], dtype=torch.int32)
        out.update(cu_seq_lens_q=whole, cu_seq_lens_k=whole, max_length_q=plan.tokens, max_length_k=plan.tokens)
        out["position_ids"] = torch.arange(plan.tokens).unsqueeze(0)
        return out

    plain = dpo_run("llama", "ref_model", tmp_path)
    monkeypatch.setattr(patching, "unpadded_call", one_sequence)
    leaking = dpo_run("llama", "ref_model", tmp_path, wrap=patched)
    assert max_diff(plain, leaking) > 1e-3


# ---------------------------------------------------------------------------------------- reward


def reward(model, tmp_path, *, peft=None, **config) -> dict[str, torch.Tensor]:
    return train_trl("Reward", model, tmp_path, preference_data(), tokenizer(), peft_config=peft, **config)


def reward_model(model_type: str):
    """A one-label sequence classifier (the reward head) with the tiny model's trunk."""
    from transformers import AutoModelForSequenceClassification

    config = tiny_model(model_type).config
    config.num_labels, config.pad_token_id = 1, 0
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config).eval()


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("model_type", TEXT_TYPES)
def test_reward_unpad_matches_unpatched(model_type, peft, tmp_path):
    """RewardTrainer with ``unpad=True`` == the unpatched run: one score per padded row, pooled
    at each row's last real token, from a forward that ran only the real tokens."""
    config = lora_config("SEQ_CLS") if peft else None
    plain = reward(reward_model(model_type), tmp_path, peft=config)
    with unpadded_calls() as counted:
        packed = reward(patched(reward_model(model_type)), tmp_path, peft=config)
    assert counted["plans"] >= 3, counted
    assert max_diff(plain, packed) <= TOL


# --------------------------------------------------------------------------- vision-language DPO


def llava_processor():
    """A LLaVA processor over the word-level vocabulary, ``<image>`` at the tiny model's image
    token (127), CLIP's image processing at the tiny vision tower's 56 pixels: 16 image tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"<image>": VOCAB - 1}
    core = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    text = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="t0",
        eos_token="t1",
        additional_special_tokens=["<image>"],
        model_input_names=["input_ids", "attention_mask"],  # 4.57 would add token_type_ids, which llava refuses
    )
    image = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    return LlavaProcessor(
        image_processor=image,
        tokenizer=text,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def image_preference_data(n: int = 8, seed: int = 0):
    """One image per prompt (random pixels, sizes differ), text as in :func:`preference_data`."""
    import numpy as np
    from datasets import Dataset
    from PIL import Image

    gen, pixels = torch.Generator().manual_seed(seed), np.random.RandomState(seed)
    rows = []
    for _ in range(n):
        height, width = (int(x) for x in torch.randint(40, 90, (2,), generator=gen))
        picture = Image.fromarray(pixels.randint(0, 255, (height, width, 3), dtype=np.uint8))
        rows.append(
            {
                "images": [picture],
                "prompt": "<image> " + words(gen, 1, 6),
                "chosen": " " + words(gen, 1, 10),
                "rejected": " " + words(gen, 1, 10),
            }
        )
    return Dataset.from_list(rows)


def dpo_vision(model, tmp_path, *, ref_model=None, peft=None) -> dict[str, torch.Tensor]:
    return train_trl(
        "DPO", model, tmp_path, image_preference_data(), llava_processor(), ref_model=ref_model, peft_config=peft
    )


@pytest.mark.parametrize("reference", ["ref_model", "lora"])
def test_dpo_with_images_unpad_matches_unpatched(reference, tmp_path):
    """DPOTrainer on image + text pairs (LLaVA): TRL left-pads the prompts, right-pads the
    completions and flushes every row left, so the unpatched run is each sequence alone again;
    with ``unpad=True`` (vision tower unchanged, text packed) the parameters agree."""

    def run(wrap):
        if reference == "ref_model":
            return dpo_vision(wrap(tiny_model("llava")), tmp_path, ref_model=wrap(tiny_model("llava")))
        return dpo_vision(wrap(tiny_model("llava")), tmp_path, peft=lora_config())

    plain = run(lambda m: m)
    with unpadded_calls() as counted:
        packed = run(patched)
    assert counted["plans"] >= 6, counted
    assert max_diff(plain, packed) <= TOL
