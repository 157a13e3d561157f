"""Do X to a patched model, then run a packed batch: exactly each sequence alone, or a typed
error. Never a silent leak (each case here leaked or misbehaved silently before)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import hf_varlen_patch
from hf_varlen_patch.errors import (
    MalformedBoundariesError,
    PackedCallError,
    PackedOutputAttentionsError,
    StalePatchError,
    UnsupportedArchitectureError,
)
from hf_varlen_patch.testing import compare_packed, make_packed_batch, tiny_model

TOL = 1e-5
TYPES = ("llama", "gpt2")


def _error(model) -> float:
    result = compare_packed(model, make_packed_batch([[5, 9, 3], [6, 7]], 128, extra_padding=2))
    return max(result.logits, result.grads, result.model_loss)


def _leaks_unpatched(model_type: str) -> bool:
    return _error(tiny_model(model_type)) > 1e-3


def _saved_and_loaded(model, how: str):
    if how == "pickle":
        return pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
@pytest.mark.parametrize("model_type", TYPES)
def test_saved_patched_model_loads_patched_and_exact(model_type, how):
    assert _leaks_unpatched(model_type)  # the batch below shows a leak
    model = hf_varlen_patch.apply(tiny_model(model_type))
    loaded = _saved_and_loaded(model, how)
    assert hf_varlen_patch.is_patched(loaded)
    assert _error(loaded) < TOL
    hf_varlen_patch.unapply(loaded)
    assert not hf_varlen_patch.is_patched(loaded)
    assert _error(loaded) > 1e-3  # really unpatched: upstream leaks again
    hf_varlen_patch.apply(loaded)
    assert _error(loaded) < TOL
    assert _error(model) < TOL


def test_loaded_model_runs_unpacked_calls_as_upstream():
    model = hf_varlen_patch.apply(tiny_model("llama"))
    loaded = _saved_and_loaded(model, "pickle")
    ids = torch.randint(1, 128, (2, 7))
    reference = tiny_model("llama")
    assert torch.equal(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)


@pytest.mark.parametrize("model_type", TYPES)
def test_deepcopy_is_patched_exact_and_leaves_the_original_alone(model_type):
    model = hf_varlen_patch.apply(tiny_model(model_type))
    model.config.pad_token_id = 7  # edits after apply
    model.config.custom_flag = True
    forward = vars(model)["forward"]
    copied = copy.deepcopy(model)
    assert model.config.pad_token_id == 7 and model.config.custom_flag is True
    assert vars(model)["forward"] is forward  # the original was not re-patched
    assert copied.config.pad_token_id == 7 and copied.config is not model.config
    assert hf_varlen_patch.is_patched(copied) and _error(copied) < TOL and _error(model) < TOL
    for a, b in zip(model.parameters(), copied.parameters()):
        assert a is not b and torch.equal(a, b)
    hf_varlen_patch.unapply(copied)
    assert _error(copied) > 1e-3 and _error(model) < TOL


def test_deepcopy_keeps_router_logits_edit_of_a_moe_model():
    model = hf_varlen_patch.apply(tiny_model("mixtral"))
    model.config.output_router_logits = True
    copied = copy.deepcopy(model)
    batch = make_packed_batch([[5, 9, 3]], 128)
    for m in (model, copied):
        assert m.config.output_router_logits is True
        out = m(input_ids=batch.input_ids, position_ids=batch.position_ids, labels=batch.labels, use_cache=False)
        assert out.aux_loss is not None


def test_unapply_keeps_config_edits_made_after_apply():
    model = tiny_model("llama")
    shared = model.config
    hf_varlen_patch.apply(model)
    model.config.pad_token_id = 3
    hf_varlen_patch.unapply(model)
    assert model.config is shared and shared.pad_token_id == 3
    assert shared._attn_implementation == "sdpa"


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_changing_attention_after_apply_is_refused_until_applied_again(implementation):
    model = hf_varlen_patch.apply(tiny_model("llama"))
    model.set_attn_implementation(implementation)
    with pytest.raises(StalePatchError, match=implementation):
        _error(model)
    hf_varlen_patch.apply(model)
    assert _error(model) < TOL
    ids = torch.randint(1, 128, (1, 6))
    reference = tiny_model("llama", attn_implementation=implementation)
    assert torch.allclose(model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-6)
    hf_varlen_patch.unapply(model)
    assert model.config._attn_implementation == implementation  # the user's choice stands


def test_dtype_and_device_moves_keep_the_patch():
    model = hf_varlen_patch.apply(tiny_model("llama"))
    model.to("cpu").double()
    assert _error(model) < TOL  # the harness compares in float32
    model.float()
    assert _error(model) < TOL


def test_compiled_patched_model_is_exact():
    model = hf_varlen_patch.apply(tiny_model("llama"))
    compiled = torch.compile(model, backend="aot_eager")
    batch = make_packed_batch([[5, 9, 3]], 128)
    out = compiled(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    eager = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    assert (out.logits - eager.logits).abs().max() < TOL


def test_output_attentions_on_a_packed_row_is_refused():
    model = hf_varlen_patch.apply(tiny_model("llama"))
    batch = make_packed_batch([[5, 9, 3]], 128)
    with pytest.raises(PackedOutputAttentionsError):
        model(input_ids=batch.input_ids, position_ids=batch.position_ids, output_attentions=True)
    # unpacked calls still return attention weights (eager)
    eager = hf_varlen_patch.apply(tiny_model("llama", attn_implementation="eager"))
    out = eager(input_ids=batch.input_ids, output_attentions=True)
    assert out.attentions[0].shape[-1] == batch.input_ids.shape[1]


def test_generate_from_a_packed_prompt_is_refused_and_plain_generate_unchanged():
    model = hf_varlen_patch.apply(tiny_model("llama"))
    batch = make_packed_batch([[5, 9, 3]], 128)
    with pytest.raises(PackedCallError, match="filled by a packed forward"):
        model.generate(input_ids=batch.input_ids, position_ids=batch.position_ids, max_new_tokens=3, do_sample=False)
    prompt = torch.randint(1, 128, (2, 5))
    reference = tiny_model("llama")
    expected = reference.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(input_ids=prompt, max_new_tokens=4, do_sample=False), expected)


def test_position_ids_that_disagree_with_cu_seq_lens_are_refused():
    model = hf_varlen_patch.apply(tiny_model("gpt2"))
    batch = make_packed_batch([[5, 9, 3]], 128)
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9, use_cache=False)
    good = model(input_ids=batch.input_ids, position_ids=batch.position_ids, **kwargs)
    alone = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    assert (good.logits - alone.logits).abs().max() < TOL
    with pytest.raises(MalformedBoundariesError, match="position_ids disagree with cu_seq_lens"):
        model(input_ids=batch.input_ids, position_ids=torch.arange(17)[None], **kwargs)
    shifted = torch.tensor([0, 7, 14, 17], dtype=torch.int32)
    with pytest.raises(MalformedBoundariesError, match="position_ids disagree"):
        model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            **{**kwargs, "cu_seq_lens_q": shifted, "cu_seq_lens_k": shifted},
        )
    # trusted offsets (check_inputs=False) are not read back: no check, no sync
    trusting = hf_varlen_patch.apply(tiny_model("gpt2"), check_inputs=False)
    trusting(input_ids=batch.input_ids, position_ids=batch.position_ids, **kwargs)


def test_seq_idx_that_disagrees_is_refused():
    model = hf_varlen_patch.apply(tiny_model("llama"))
    batch = make_packed_batch([[5, 9, 3]], 128)
    good = torch.repeat_interleave(torch.arange(3), torch.tensor([5, 9, 3]))[None].to(torch.int32)
    model(input_ids=batch.input_ids, position_ids=batch.position_ids, seq_idx=good, use_cache=False)
    bad = torch.repeat_interleave(torch.arange(3), torch.tensor([6, 8, 3]))[None].to(torch.int32)
    with pytest.raises(MalformedBoundariesError, match="seq_idx disagrees"):
        model(input_ids=batch.input_ids, position_ids=batch.position_ids, seq_idx=bad, use_cache=False)
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    with pytest.raises(MalformedBoundariesError, match="seq_idx disagrees"):
        model(
            input_ids=batch.input_ids,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=9,
            max_length_k=9,
            seq_idx=bad,
            use_cache=False,
        )


@pytest.mark.parametrize("method", ["lora", "ia3"])
@pytest.mark.parametrize("order", ["apply_first", "peft_first"])
def test_weight_peft_methods_stay_exact(method, order):
    from peft import IA3Config, LoraConfig, get_peft_model

    config = (
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        if method == "lora"
        else IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
        )
    )
    model = tiny_model("llama")
    if order == "apply_first":
        peft_model = get_peft_model(hf_varlen_patch.apply(model), config)
    else:
        peft_model = hf_varlen_patch.apply(get_peft_model(model, config))
    assert _error(peft_model) < TOL


PROMPT_METHODS = ["prompt_tuning", "p_tuning", "prefix_tuning"]


def _prompt_config(method: str):
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    kinds = {"prompt_tuning": PromptTuningConfig, "p_tuning": PromptEncoderConfig, "prefix_tuning": PrefixTuningConfig}
    extra = {"encoder_hidden_size": 16} if method == "p_tuning" else {}
    return kinds[method](task_type="CAUSAL_LM", num_virtual_tokens=4, **extra)


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_prompt_learning_is_refused_when_wrapped_before_apply(method):
    from peft import get_peft_model

    peft_model = get_peft_model(tiny_model("llama"), _prompt_config(method))
    with pytest.raises(UnsupportedArchitectureError, match="virtual tokens"):
        hf_varlen_patch.apply(peft_model)


@pytest.mark.parametrize("method", PROMPT_METHODS)
def test_prompt_learning_refuses_packed_calls_when_wrapped_after_apply(method):
    from peft import get_peft_model

    peft_model = get_peft_model(hf_varlen_patch.apply(tiny_model("llama")), _prompt_config(method))
    batch = make_packed_batch([[5, 9, 3]], 128)
    with pytest.raises(PackedCallError, match="virtual tokens"):
        peft_model(input_ids=batch.input_ids, position_ids=batch.position_ids, labels=batch.labels)
    # an unpacked call is PEFT's as usual
    peft_model(input_ids=batch.input_ids, labels=batch.labels)


def test_encoder_decoder_models_are_refused():
    from transformers import BartConfig, BartForConditionalGeneration

    from hf_varlen_patch.testing import tiny_config

    model = BartForConditionalGeneration(BartConfig(**tiny_config("bart").to_dict()))
    with pytest.raises(UnsupportedArchitectureError, match="encoder-decoder"):
        hf_varlen_patch.apply(model)
