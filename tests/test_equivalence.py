"""Property tests: packed == per-sequence (logits, loss, gradients) for every registered
architecture, fp32 on CPU through the exact reference backend."""

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_varlen_patch
from hf_varlen_patch.testing import (
    compare_packed,
    make_packed_batch,
    model_shifts_labels,
    packed_layouts,
    registered_variants,
    tiny_model,
)

TOL = 1e-5
VARIANTS = registered_variants()
#: Variants written by hand in a family module (each exercises a code path) get the full property
#: test; types tested on their default tiny twin (the generic-route decoders) a shorter one, so CI
#: stays within its time while every registered type still meets random layouts.
GENERATED = ("twin", "decoder")  # variant names of generated tiny twins
HAND = [v for v in VARIANTS if v[1] not in GENERATED]
TWINS = [v for v in VARIANTS if v[1] in GENERATED]


@functools.cache
def patched_model(model_type: str, variant: str, backend: str = "auto"):
    model = tiny_model(model_type, variant)
    return hf_varlen_patch.apply(model, backend=backend)


def _check_layout(model_type, variant, layout, use_cache):
    model = patched_model(model_type, variant)
    batch = make_packed_batch(vocab_size=model.config.vocab_size, **layout)
    result = compare_packed(model, batch, use_cache=use_cache, train=True)
    assert result.ok(TOL), f"{model_type}/{variant}: {result}"


@pytest.mark.parametrize("model_type, variant", HAND)
@given(layout=packed_layouts(max_rows=3, max_sequences=8, max_length=64), use_cache=st.sampled_from([None, False]))
def test_packed_equals_separate(model_type, variant, layout, use_cache):
    _check_layout(model_type, variant, layout, use_cache)


@pytest.mark.parametrize("model_type, variant", TWINS)
@settings(max_examples=6)
@given(layout=packed_layouts(max_rows=3, max_sequences=5, max_length=40), use_cache=st.sampled_from([None, False]))
def test_twin_packed_equals_separate(model_type, variant, layout, use_cache):
    _check_layout(model_type, variant, layout, use_cache)


@pytest.mark.parametrize("model_type, variant", VARIANTS)
def test_eval_mode_and_default_cache(model_type, variant):
    model = patched_model(model_type, variant)
    batch = make_packed_batch([[7, 1, 30], [12, 12, 2, 5]], model.config.vocab_size, extra_padding=2, seed=3)
    result = compare_packed(model, batch, use_cache=True, train=False)
    assert result.ok(TOL), result


@pytest.mark.parametrize("model_type, variant", VARIANTS)
def test_collator_kwargs(model_type, variant):
    """DataCollatorWithFlattening's cu_seq_lens_* / max_length_* kwargs, with and without position_ids."""
    from transformers import DataCollatorWithFlattening

    model = patched_model(model_type, variant)
    batch = make_packed_batch([[9, 4, 17, 1, 6]], model.config.vocab_size, seed=5)
    features = [{"input_ids": seq.tolist()} for seq in batch.sequences]
    collated = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")(features)
    assert "cu_seq_lens_q" in collated
    model.eval()
    with torch.no_grad():
        refs = [model(input_ids=s[None], use_cache=False).logits[0] for s in batch.sequences]
        ref = torch.cat(refs)[None]
        full = model(**collated)
        no_pos = {k: v for k, v in collated.items() if k != "position_ids"}
        without_positions = model(**no_pos)
    assert (full.logits - ref).abs().max() <= TOL
    assert (without_positions.logits - ref).abs().max() <= TOL
    if not model_shifts_labels(model):
        return  # the collator's labels follow the shift-inside convention these models do not use
    # the collator's labels already mask each sequence start; the model's loss matches
    with torch.no_grad():
        separate = [model(input_ids=s[None], labels=s[None]).loss * (len(s) - 1) for s in batch.sequences if len(s) > 1]
    count = sum(len(s) - 1 for s in batch.sequences)
    assert abs(float(full.loss) - float(sum(separate)) / count) <= TOL


#: generic, legacy and own-attention families; bart/whisper/trocr/mvp/blenderbot reach attention through the
#: context on 4.57 and (trocr, mvp) through the hidden states their 5.x layers replay
#: and legacy families whose attention finds the boundaries in the context (ctrl and openai-gpt cannot checkpoint);
#: the engine reruns every checkpointed module inside the packed forward's context, reentrant or not
CHECKPOINTED = [
    "llama",
    "gpt2",
    "qwen2_moe",
    "bert",
    "roberta",
    "bart",
    "whisper",
    "trocr",
    "mvp",
    "blenderbot",
    "gpt_neo",
    "bloom",
    "mpt",
    "falcon",
    "gptj",
    "xglm",
    "roformer",
    "phimoe",
]


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("model_type", CHECKPOINTED)
def test_gradient_checkpointing(model_type, reentrant):
    model = tiny_model(model_type)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable({"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    hf_varlen_patch.apply(model)
    batch = make_packed_batch([[5, 9, 3], [12, 7]], model.config.vocab_size, seed=2)
    result = compare_packed(model, batch, use_cache=False, train=True)
    assert result.ok(TOL), result


def test_upstream_leaks_without_the_patch():
    """The harness can fail: an unpatched llama with the default cache mixes sequences."""
    model = tiny_model("llama")
    batch = make_packed_batch([[5, 9, 3]], model.config.vocab_size)
    assert compare_packed(model, batch, use_cache=None, grads=False).logits > 1e-2


@pytest.mark.parametrize("on", ["model", "base_model"])
def test_checkpoint_functions_carry_the_context_as_soon_as_checkpointing_is_enabled(on):
    """Enabling checkpointing after apply (as Trainer does, on the model or its base model) wraps
    every checkpoint function at once, before the first step (no forward wrapper, no graph break);
    unapply takes them off."""
    from hf_varlen_patch.patching import _CheckpointCarryingBoundaries

    model = hf_varlen_patch.apply(tiny_model("llama"))
    getattr(model, on).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    functions = [
        vars(m)["_gradient_checkpointing_func"] for m in model.modules() if "_gradient_checkpointing_func" in vars(m)
    ]
    assert functions and all(isinstance(f, _CheckpointCarryingBoundaries) for f in functions)
    hf_varlen_patch.unapply(model)
    functions = [
        vars(m)["_gradient_checkpointing_func"] for m in model.modules() if "_gradient_checkpointing_func" in vars(m)
    ]
    assert functions and not any(isinstance(f, _CheckpointCarryingBoundaries) for f in functions)
