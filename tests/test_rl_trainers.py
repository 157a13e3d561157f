"""TRL's online and unpaired RL trainers (GRPO, KTO) on padded batches, with ``apply(model, unpad=True)``.

Every check trains three plain SGD steps in float32 on the CPU (``SGD`` of test_preference_rl) and
compares the parameters with a reference run, asserting that the packed path really ran.

GRPO (HF ``generate`` path, no vLLM) left-pads the prompts and right-pads the completions, so its
log-prob rows have padding on both sides, and its padded forward passes no ``position_ids``: the
unpatched model numbers a left-padded row's positions from the row start, which is not each
sequence alone. The reference run is therefore an oracle, :func:`each_sequence_alone`: the
unpatched model whose base model runs every padded row's real tokens alone. Generation (calls
with a cache) runs upstream's code in every run, and the sampled completions must be the same.

What left padding does upstream, measured here (``test_grpo_upstream_left_padding`` after three
steps, ``test_grpo_per_token_logps`` in one log-prob pass): only GPT-2 (learned absolute
positions) sees it. RoPE attention (llama, qwen2, the hybrid's attention layers) sees relative
positions only, which a constant shift of a row leaves unchanged, and the hybrid's gated delta
rule and convolution zero the padding, so there the unpatched run equals the oracle to float32
rounding.

KTO pads every sequence on the right (its own collator: prompt + completion, and the mismatched
KL pairs likewise), so the unpatched run is each sequence alone and is the reference.
"""

from __future__ import annotations

import pytest
import torch
from test_preference_rl import (
    SGD,
    TEXT_TYPES,
    TOL,
    lora_config,
    max_diff,
    params,
    patched,
    tokenizer,
    train_trl,
    unpadded_calls,
    words,
)

from hf_varlen_patch import patching
from hf_varlen_patch.testing import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore")


# ------------------------------------------------------------------------------------------ oracle


def each_sequence_alone(model):
    """The "each sequence alone" oracle, on an unpatched model (in place; returns it).

    Its base model (what TRL's fused log-prob head runs, ``model.base_model(...)``), called without
    a cache on an ``attention_mask`` with padding, runs every row's real tokens alone (a batch of
    one, no padding, positions from 0) and returns what the fused head reads in the padded layout,
    zeros at padding: ``last_hidden_state``, and a MoE model's ``router_logits`` (one
    ``(batch * length, experts)`` tensor per layer, for the load-balancing loss, which the head
    masks with the padded ``attention_mask``). Calls with a cache (``generate``) and calls without
    padding run upstream's code unchanged."""
    base = model.base_model
    forward = base.forward

    def alone(*args, **kwargs):
        if args:  # GPT-2's LM head passes input_ids positionally
            (kwargs["input_ids"],) = args
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        cached = kwargs.get("past_key_values") is not None or kwargs.get("use_cache")
        if cached or mask is None or bool(mask.all()):
            return forward(**kwargs)
        assert kwargs.get("position_ids") is None and kwargs.get("inputs_embeds") is None, sorted(kwargs)
        batch, length = ids.shape
        real = [row.nonzero().squeeze(1) for row in mask]
        runs = [
            forward(**{**kwargs, "input_ids": ids[r, at][None], "attention_mask": torch.ones_like(at)[None]})
            for r, at in enumerate(real)
        ]
        flat = torch.cat([r * length + at for r, at in enumerate(real)])  # each real token's padded spot

        def padded(per_token: torch.Tensor) -> torch.Tensor:  # (real tokens, ...) -> (batch * length, ...)
            return per_token.new_zeros(batch * length, *per_token.shape[1:]).index_copy(0, flat, per_token)

        hidden = padded(torch.cat([run.last_hidden_state[0] for run in runs]))
        out = {"last_hidden_state": hidden.view(batch, length, -1)}
        if getattr(runs[0], "router_logits", None) is not None:
            out["router_logits"] = tuple(
                padded(torch.cat(layer)) for layer in zip(*(run.router_logits for run in runs))
            )
        return type(runs[0])(**out)

    base.forward = alone
    return model


# -------------------------------------------------------------------------------------------- GRPO

#: a completion ends at any of these ids (t1 is the tokenizer's eos): with a tiny random model
#: about one token in eight, so completions have different lengths and are right-padded
STOP_IDS = list(range(1, 17))


def policy(model_type: str):
    model = tiny_model(model_type)
    model.generation_config.eos_token_id = STOP_IDS
    return model


def prompts(n: int = 8, seed: int = 0):
    """Prompts of 2-9 words: TRL left-pads them."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    return Dataset.from_list([{"prompt": words(gen, 2, 10)} for _ in range(n)])


def low_ids(completion_ids, **kwargs) -> list[float]:
    """A deterministic reward: how many of the completion's tokens have ids below 64."""
    return [float(sum(t < 64 for t in ids)) for ids in completion_ids]


def grpo_trainer(model, tmp_path, *, peft=None, data=None, processing_class=None, **config):
    """GRPO over :func:`prompts` (or ``data``) with the word-level tokenizer (or ``processing_class``)."""
    from trl import GRPOConfig, GRPOTrainer

    # 4 completions per step: 2 prompts x 2 generations of at most 6 tokens, sampled (seeded)
    args = GRPOConfig(output_dir=str(tmp_path), num_generations=2, max_completion_length=6, **{**SGD, **config})
    return GRPOTrainer(
        model=model,
        reward_funcs=low_ids,
        args=args,
        train_dataset=prompts() if data is None else data,
        processing_class=tokenizer() if processing_class is None else processing_class,
        peft_config=peft,
    )


def grpo(model, tmp_path, *, peft=None, **config) -> tuple[dict, list, list]:
    """Parameters after 3 steps, the completions generated at each step, and the attention
    masks of the log-prob passes."""
    trainer = grpo_trainer(model, tmp_path, peft=peft, **config)
    completions, masks = [], []
    generate, logps = trainer._generate_single_turn, trainer._get_per_token_logps_and_entropies

    def generating(*args, **kwargs):
        out = generate(*args, **kwargs)
        completions.append(out[0])
        return out

    def scoring(model, input_ids, attention_mask, *args, **kwargs):
        masks.append(attention_mask.clone())
        return logps(model, input_ids, attention_mask, *args, **kwargs)

    trainer._generate_single_turn, trainer._get_per_token_logps_and_entropies = generating, scoring
    trainer.train()  # (GRPO's own sampler: each prompt repeated num_generations times, seeded)
    return params(trainer.model), completions, masks


def padded_on_both_sides(mask: torch.Tensor) -> bool:
    return bool(((mask[:, 0] == 0) & (mask[:, -1] == 0)).any())


@pytest.mark.parametrize("model_type", TEXT_TYPES)
def test_grpo_unpad_matches_each_sequence_alone(model_type, tmp_path):
    """GRPOTrainer with ``unpad=True`` == the oracle: the same completions are sampled (generation
    runs upstream's code), and the log-prob passes (rows padded on both sides) run each sequence
    alone. Measured (transformers 5.25 / 4.57.6): llama 7.5e-9 / 7.5e-9, qwen2 6.0e-8 / 6.0e-8,
    gpt2 1.1e-8 / 1.1e-8, the hybrid 1.2e-7 (qwen3_5_text) / 1.3e-8 (qwen3_next, a MoE: its
    load-balancing loss is in the loss too)."""
    alone, alone_completions, _ = grpo(each_sequence_alone(policy(model_type)), tmp_path)
    with unpadded_calls() as counted:
        packed, packed_completions, masks = grpo(patched(policy(model_type)), tmp_path)
    assert counted["plans"] >= 3, counted  # the policy's log-prob pass of each step
    assert any(padded_on_both_sides(m) for m in masks)
    assert len(packed_completions) == 3 and packed_completions == alone_completions
    assert max_diff(alone, packed) <= TOL


#: whether the unpatched model sees left padding (positions counted from the row start) at all
UPSTREAM = {"llama": "equal", "qwen2": "equal", "gpt2": "differs", "qwen3_next": "equal", "qwen3_5_text": "equal"}


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_grpo_upstream_left_padding(model_type, tmp_path):
    """What the unpatched model does with GRPO's left-padded rows (no ``position_ids``: positions
    counted from the row start), after 3 steps, on both transformers lines. GPT-2 adds a learned
    embedding of that position: 2.1e-2 away from the oracle (and other completions sampled from
    step 2 on). llama rotates queries and keys by it, but RoPE scores depend only on the distance
    between query and key, which shifting a whole row keeps: 1.1e-8, float32 rounding, the same
    completions. Likewise, measured, qwen2 6.0e-8 and the hybrid 1.2e-7 (qwen3_5_text) / 7.5e-9
    (qwen3_next): RoPE attention, and a gated delta rule and convolution that zero the padding
    (``test_grpo_per_token_logps`` checks all four types in one log-prob pass)."""
    alone, alone_completions, _ = grpo(each_sequence_alone(policy(model_type)), tmp_path)
    plain, plain_completions, _ = grpo(policy(model_type), tmp_path)
    if UPSTREAM[model_type] == "differs":
        assert max_diff(alone, plain) > 1e-3
    else:
        assert plain_completions == alone_completions
        assert max_diff(alone, plain) <= TOL


@pytest.fixture
def reference_from(monkeypatch):
    """GRPO builds its reference model from the policy's Hub id when ``beta > 0``; the tiny
    models have none, so the test hands it the model instead."""

    def use(model):
        monkeypatch.setattr("trl.trainer.grpo_trainer.create_model_from_path", lambda *args, **kwargs: model)

    return use


@pytest.mark.parametrize("reference", ["ref_model", "lora"])
def test_grpo_with_a_reference_model(reference, reference_from, tmp_path):
    """``beta > 0``: each step also scores the completions with the reference (a second model,
    or the LoRA policy with its adapter disabled), padded on both sides, and that pass runs packed
    too. GPT-2, on which the unpatched run visibly differs from the oracle. Measured (both lines):
    unpad vs oracle 1.2e-8 (reference model) and 7.5e-9 (LoRA); unpatched 2.1e-2 and 6.4e-3."""
    config = dict(beta=0.1, peft=lora_config() if reference == "lora" else None)
    if reference == "ref_model":
        reference_from(each_sequence_alone(policy("gpt2")))
    alone, alone_completions, _ = grpo(each_sequence_alone(policy("gpt2")), tmp_path, **config)
    if reference == "ref_model":
        reference_from(patched(policy("gpt2")))
    with unpadded_calls() as counted:
        packed, packed_completions, _ = grpo(patched(policy("gpt2")), tmp_path, **config)
    assert counted["plans"] >= 6, counted  # the policy's and the reference's pass of each step
    assert packed_completions == alone_completions
    assert max_diff(alone, packed) <= TOL


def both_sides_batch(seed: int = 1):
    """A batch as GRPO builds it: 2-9 prompt tokens left-padded, then 1-6 completion tokens
    right-padded (every row but the longest padded on the left, some on both sides)."""
    from trl.trainer.utils import pad

    gen = torch.Generator().manual_seed(seed)
    ids = lambda low, high: torch.randint(2, 128, (int(torch.randint(low, high, (1,), generator=gen)),), generator=gen)  # noqa: E731
    prompt, completion = [ids(2, 10) for _ in range(4)], [ids(1, 7) for _ in range(4)]
    ones = lambda rows: [torch.ones_like(r) for r in rows]  # noqa: E731
    input_ids = torch.cat([pad(prompt, 0, "left"), pad(completion, 0, "right")], dim=1)
    mask = torch.cat([pad(ones(prompt), 0, "left"), pad(ones(completion), 0, "right")], dim=1)
    return input_ids, mask, max(len(c) for c in completion)


def per_token_logps(model, tmp_path, batch) -> torch.Tensor:
    """One ``_get_per_token_logps_and_entropies`` call, as in GRPO's loss."""
    trainer = grpo_trainer(model, tmp_path)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, *batch, compute_entropy=True)
    return logps


@pytest.mark.parametrize("model_type", TEXT_TYPES)
def test_grpo_per_token_logps(model_type, tmp_path):
    """One log-prob pass on a batch padded on both sides, largest |difference| from the oracle,
    on both transformers lines: unpad 4.8e-7 on every type (one float32 ulp of a log-prob near
    -4.9); unpatched 4.8e-7 on llama and qwen2, 0 / 4.8e-7 on the hybrid, 1.95e-1 on GPT-2."""
    batch = both_sides_batch()
    alone = per_token_logps(each_sequence_alone(policy(model_type)), tmp_path, batch)
    with unpadded_calls() as counted:
        packed = per_token_logps(patched(policy(model_type)), tmp_path, batch)
    plain = per_token_logps(policy(model_type), tmp_path, batch)
    unpad_error, upstream_error = float((packed - alone).abs().max()), float((plain - alone).abs().max())
    print(f"\n{model_type}: unpad vs alone {unpad_error:.2e}, unpatched vs alone {upstream_error:.2e}")
    assert counted["plans"] == 1, counted
    assert unpad_error <= 1e-5
    assert (upstream_error > 1e-2) == (UPSTREAM[model_type] == "differs")


def test_the_grpo_oracle_sees_a_leak(tmp_path, monkeypatch):
    """The oracle comparison is sharp: with the packed row's boundaries dropped (every sequence of
    the row attends to the ones before it) one log-prob pass of llama is far from the oracle
    (measured 1.6e-1, both lines)."""
    original = patching.unpadded_call

    def one_sequence(call, plan):
        out = original(call, plan)
        whole = torch.tensor([0, plan.tokens], dtype=torch.int32)
        out.update(cu_seq_lens_q=whole, cu_seq_lens_k=whole, max_length_q=plan.tokens, max_length_k=plan.tokens)
        out["position_ids"] = torch.arange(plan.tokens).unsqueeze(0)
        return out

    batch = both_sides_batch()
    alone = per_token_logps(each_sequence_alone(policy("llama")), tmp_path, batch)
    monkeypatch.setattr(patching, "unpadded_call", one_sequence)
    leaking = per_token_logps(patched(policy("llama")), tmp_path, batch)
    assert float((leaking - alone).abs().max()) > 1e-2


# --------------------------------------------------------------------------------------------- KTO


def unpaired_data(n: int = 12, seed: int = 0):
    """Prompts of 2-8 words, completions of 1-11, desirable or not (mixed in every batch)."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    rows = [{"prompt": words(gen, 2, 9), "completion": " " + words(gen, 1, 12), "label": i % 3 != 0} for i in range(n)]
    return Dataset.from_list(rows)


def kto(model, tmp_path, *, ref_model=None, peft=None, **config) -> dict[str, torch.Tensor]:
    return train_trl(
        "KTO", model, tmp_path, unpaired_data(), tokenizer(), ref_model=ref_model, peft_config=peft, **config
    )


def kto_run(model_type: str, reference: str, tmp_path, wrap=lambda m: m) -> dict[str, torch.Tensor]:
    if reference == "ref_model":
        return kto(wrap(tiny_model(model_type)), tmp_path, ref_model=wrap(tiny_model(model_type)))
    return kto(wrap(tiny_model(model_type)), tmp_path, peft=lora_config())


@pytest.mark.parametrize("reference", ["ref_model", "lora"])
@pytest.mark.parametrize("model_type", TEXT_TYPES)
def test_kto_unpad_matches_unpatched(model_type, reference, tmp_path):
    """KTOTrainer (kto loss, KL term on) with ``unpad=True`` == the unpatched run: its collator
    pads on the right, so the unpatched run is each sequence alone. Per step the policy runs the
    KL pairs and the completions, the reference (a model, or the LoRA policy with its adapter
    disabled) both again: four packed forwards. Measured (both lines): <= 7.5e-9."""
    plain = kto_run(model_type, reference, tmp_path)
    with unpadded_calls() as counted:
        packed = kto_run(model_type, reference, tmp_path, wrap=patched)
    assert counted["plans"] >= 12, counted
    assert max_diff(plain, packed) <= TOL


# ------------------------------------------------------------------------- GRPO with images


#: TRL takes multimodal prompts as conversations: an image part, then the words
CHAT_TEMPLATE = (
    "{% for message in messages %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }} {% endif %}"
    "{% endfor %}{% endfor %}"
)


def image_prompts(n: int = 8, seed: int = 0):
    """One image per prompt (random pixels of different sizes) and 1-5 words, as a conversation."""
    from test_preference_rl import image_preference_data

    def conversation(row):
        words_only = row["prompt"].removeprefix("<image> ")
        return {"image": row["images"][0], "prompt": [{"role": "user", "content": words_only}]}

    return image_preference_data(n, seed).map(conversation, remove_columns=["images", "chosen", "rejected"])


def grpo_images(model, tmp_path, reference: str) -> dict[str, torch.Tensor]:
    """Parameters after 3 GRPO steps on :func:`image_prompts` (``reference="lora"``: beta 0.1, the
    reference being the LoRA policy with its adapter disabled)."""
    from test_preference_rl import llava_processor

    processor = llava_processor()
    processor.chat_template = CHAT_TEMPLATE
    model.generation_config.eos_token_id = STOP_IDS
    config = dict(beta=0.1, peft=lora_config()) if reference == "lora" else {}
    trainer = grpo_trainer(model, tmp_path, data=image_prompts(), processing_class=processor, **config)
    trainer.train()
    return params(trainer.model)


@pytest.mark.parametrize("reference", ["none", "lora"])
def test_grpo_with_images_unpad_matches_unpatched(reference, tmp_path):
    """GRPOTrainer on image prompts (LLaVA, HF generate): TRL left-pads the prompts (image tokens
    first) and right-pads the completions, the images go through the vision tower as upstream
    sends them, the text runs packed. LLaVA's language model is a Llama (RoPE), on which the
    unpatched run's left padding equals each sequence alone (``test_grpo_upstream_left_padding``;
    each VLM's left-padded rows equal its samples alone: ``tests/test_unpad.py``), so the unpatched
    run is the reference here: the same parameters after 3 steps."""
    plain = grpo_images(tiny_model("llava"), tmp_path, reference)
    with unpadded_calls() as counted:
        packed = grpo_images(patched(tiny_model("llava")), tmp_path, reference)
    assert counted["plans"] >= (6 if reference == "lora" else 3), counted
    assert max_diff(plain, packed) <= TOL
