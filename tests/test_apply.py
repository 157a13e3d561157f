"""apply / unapply contract: reversible, idempotent, instance-bound, unpacked behaviour unchanged."""

import copy
import filecmp
import os

import pytest
import torch
import transformers

import hf_varlen_patch
from hf_varlen_patch import (
    BackendUnavailableError,
    BoundariesLostError,
    UnsupportedArchitectureError,
    UnsupportedVersionError,
    VarlenPatchError,
)
from hf_varlen_patch.testing import make_packed_batch, registered_variants, tiny_model

MODEL_TYPES = ["llama", "gpt2", "gemma2", "qwen2_moe", "mistral"]


def _snapshot(model):
    """Every module's instance attributes (by identity) and the config's attention implementation."""
    return (
        {name: dict(vars(m)) for name, m in model.named_modules()},
        model.config,
        model.config._attn_implementation,
    )


def _assert_same_snapshot(a, b):
    mods_a, cfg_a, impl_a = a
    mods_b, cfg_b, impl_b = b
    assert cfg_a is cfg_b and impl_a == impl_b
    assert mods_a.keys() == mods_b.keys()
    for name in mods_a:
        assert mods_a[name].keys() == mods_b[name].keys(), name
        for key in mods_a[name]:
            assert mods_a[name][key] is mods_b[name][key], (name, key)


def _padded_batch(vocab):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (3, 12), generator=gen)
    right = torch.ones(3, 12, dtype=torch.long)
    right[1, 8:] = 0
    right[2, 5:] = 0
    left = right.flip(-1)
    return ids, right, left


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_unapply_restores_exactly_and_apply_is_idempotent(model_type):
    model = tiny_model(model_type)
    before = _snapshot(model)
    assert hf_varlen_patch.apply(model) is model
    wrapped_forward = model.forward
    hf_varlen_patch.apply(model)
    assert model.forward is wrapped_forward  # not wrapped twice
    assert hf_varlen_patch.is_patched(model)
    hf_varlen_patch.unapply(model)
    assert not hf_varlen_patch.is_patched(model)
    _assert_same_snapshot(before, _snapshot(model))
    hf_varlen_patch.unapply(model)  # unapplying an unpatched model is a no-op


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_unpacked_inputs_give_bitwise_identical_outputs(model_type):
    model = tiny_model(model_type).eval()
    ids, right, left = _padded_batch(model.config.vocab_size)
    cases = [
        dict(input_ids=ids),
        dict(input_ids=ids, attention_mask=right),
        dict(input_ids=ids, attention_mask=left),
        dict(input_ids=ids, position_ids=torch.arange(12).expand(3, 12)),
        dict(input_ids=ids, attention_mask=left, position_ids=(left.cumsum(-1) - 1).clamp(min=0)),
        dict(input_ids=ids, attention_mask=right, use_cache=False),
    ]
    with torch.no_grad():
        expected = [model(**c).logits for c in cases]
        hf_varlen_patch.apply(model)
        got = [model(**c).logits for c in cases]
    for e, g in zip(expected, got):
        assert torch.equal(e, g)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_greedy_generate_is_unchanged(model_type):
    model = tiny_model(model_type).eval()
    ids, _, left = _padded_batch(model.config.vocab_size)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, attention_mask=left, **kwargs)
    single = model.generate(ids[:1], **kwargs)
    hf_varlen_patch.apply(model)
    assert torch.equal(model.generate(ids, attention_mask=left, **kwargs), expected)
    assert torch.equal(model.generate(ids[:1], **kwargs), single)


def test_save_pretrained_writes_the_same_files(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "before")
    hf_varlen_patch.apply(model)
    model.save_pretrained(tmp_path / "after")
    names = sorted(os.listdir(tmp_path / "before"))
    assert names == sorted(os.listdir(tmp_path / "after"))
    match, mismatch, errors = filecmp.cmpfiles(tmp_path / "before", tmp_path / "after", names, shallow=False)
    assert not mismatch and not errors, mismatch
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "after")
    assert not reloaded.config._attn_implementation.startswith("hf_varlen")


def test_a_sibling_model_sharing_the_config_is_untouched():
    config = tiny_model("llama").config
    patched = transformers.AutoModelForCausalLM.from_config(config)
    sibling = transformers.AutoModelForCausalLM.from_config(config)
    impl = sibling.config._attn_implementation
    hf_varlen_patch.apply(patched)
    assert sibling.config._attn_implementation == impl
    assert "forward" not in vars(sibling) and not hf_varlen_patch.is_patched(sibling)
    batch = make_packed_batch([[5, 9, 3]], config.vocab_size)
    sibling.load_state_dict(patched.state_dict())
    with torch.no_grad():
        a = patched(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
        b = sibling(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    assert (a - b).abs().max() > 1e-3  # the sibling still runs upstream's (leaky) path


def test_unknown_architecture_lists_what_is_supported():
    model = tiny_model("llama")
    model.config = copy.copy(model.config)
    model.config.model_type = "not_a_real_model"
    with pytest.raises(UnsupportedArchitectureError, match="Supported: .*llama"):
        hf_varlen_patch.apply(model, self_check="never")


def test_not_a_transformers_model():
    with pytest.raises(UnsupportedArchitectureError, match="PreTrainedModel"):
        hf_varlen_patch.apply(torch.nn.Linear(2, 2))


def test_wrappers_are_unwrapped():
    class DDPLike(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    model = tiny_model("llama")
    hf_varlen_patch.apply(DDPLike(model))
    assert hf_varlen_patch.is_patched(model)


@pytest.mark.parametrize("version", ["4.56.2", "6.0.0", "4.46.0"])
def test_unsupported_transformers_version(monkeypatch, version):
    model = tiny_model("llama")
    monkeypatch.setattr(transformers, "__version__", version)
    with pytest.raises(UnsupportedVersionError, match=version):
        hf_varlen_patch.apply(model)


def test_unknown_backend_name():
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        hf_varlen_patch.apply(tiny_model("llama"), backend="nope")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal of GPU-only backends")
@pytest.mark.parametrize("backend", ["torch", "flash_attn", "flex"])
def test_named_backend_that_cannot_run_raises(backend):
    model = hf_varlen_patch.apply(tiny_model("llama"), backend=backend)
    batch = make_packed_batch([[5, 9, 3]], model.config.vocab_size)
    with pytest.raises(BackendUnavailableError, match=backend):
        model(input_ids=batch.input_ids, position_ids=batch.position_ids)


def test_packed_input_with_a_filled_cache_is_refused():
    model = hf_varlen_patch.apply(tiny_model("llama")).eval()
    batch = make_packed_batch([[5, 9, 3]], model.config.vocab_size)
    with torch.no_grad():
        past = model(input_ids=batch.input_ids[:, :4], use_cache=True).past_key_values
        with pytest.raises(VarlenPatchError, match="cache"):
            model(input_ids=batch.input_ids, position_ids=batch.position_ids, past_key_values=past)


def test_malformed_position_ids_are_refused_at_the_forward():
    model = hf_varlen_patch.apply(tiny_model("llama"))
    ids = torch.randint(0, 100, (1, 6))
    with pytest.raises(hf_varlen_patch.MalformedBoundariesError, match="input_ids"):
        model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, 0, 1]]))
    with pytest.raises(hf_varlen_patch.MalformedBoundariesError, match="negative"):
        model(input_ids=ids, position_ids=torch.tensor([[0, 1, 2, -1, 0, 1]]))
    with pytest.raises(hf_varlen_patch.MalformedBoundariesError, match="ends at"):
        model(input_ids=ids, cu_seq_lens_q=torch.tensor([0, 2, 5], dtype=torch.int32), max_length_q=3)


def test_boundaries_that_never_reach_a_layer_raise():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from hf_varlen_patch.attention import packed_mask_placeholder, register_implementation

    fn = ALL_ATTENTION_FUNCTIONS[register_implementation("sdpa", "sdpa")]
    q = torch.randn(1, 2, 4, 8)
    module = torch.nn.Module()
    with pytest.raises(BoundariesLostError, match="without its boundaries"):
        fn(module, q, q, q, packed_mask_placeholder(1, 4, q.device))


def test_labels_are_masked_at_sequence_starts():
    """Passing plain input_ids as labels must not add loss terms across boundaries."""
    model = hf_varlen_patch.apply(tiny_model("llama")).eval()
    batch = make_packed_batch([[5, 9, 3]], model.config.vocab_size)
    with torch.no_grad():
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids, labels=batch.input_ids).loss
        sums = [model(input_ids=s[None], labels=s[None]).loss * (len(s) - 1) for s in batch.sequences]
    assert abs(float(packed) - float(sum(sums)) / (17 - 3)) < 1e-5
    assert batch.input_ids.min() >= 1  # the caller's labels were not modified in place


def test_attention_dropout_runs_through_a_backend_that_has_it():
    """p > 0 in train mode: the reference applies dropout (runs differ); eval mode is exact."""
    model = tiny_model("llama")
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    hf_varlen_patch.apply(model)
    batch = make_packed_batch([[5, 9, 3]], model.config.vocab_size)
    inputs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids)
    model.train()
    with torch.no_grad():
        a, b = model(**inputs).logits, model(**inputs).logits
    assert (a - b).abs().max() > 1e-4
    model.eval()
    assert torch.isfinite(model(**inputs).logits).all()


def test_autocast_puts_fp32_rotary_outputs_back_in_the_autocast_dtype(monkeypatch):
    """Under bf16 autocast, rotary leaves q/k in fp32; half-precision kernels must get bf16."""
    from hf_varlen_patch import attention

    seen = []
    real = attention.select_backend

    def spy(name, device, dtype, needed):
        seen.append(dtype)
        return real(name, device, dtype, needed)

    monkeypatch.setattr(attention, "select_backend", spy)
    model = hf_varlen_patch.apply(tiny_model("llama"))
    batch = make_packed_batch([[5, 9, 3]], model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=batch.input_ids, position_ids=batch.position_ids)
    assert seen and all(d == torch.bfloat16 for d in seen)


@pytest.mark.parametrize(
    "model_type, rope",
    [("llama", {"rope_type": "dynamic", "factor": 2.0}), ("qwen2", {"rope_type": "dynamic", "factor": 2.0})],
)
def test_length_dependent_rope_is_refused(model_type, rope):
    """Dynamic NTK scaling picks frequencies from the whole row's length: packing would change them."""
    from hf_varlen_patch.patches._common import tiny_config

    model = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type, rope_scaling=rope))
    with pytest.raises(UnsupportedArchitectureError, match="dynamic"):
        hf_varlen_patch.apply(model)
    assert not hf_varlen_patch.is_patched(model)


def test_falcon_alibi_with_many_heads_warns(caplog):
    """Upstream rounds ALiBi products to bf16 above 8 heads; apply says so instead of hiding it."""
    from hf_varlen_patch.patches._common import tiny_config

    config = tiny_config("falcon", alibi=True, num_attention_heads=16, new_decoder_architecture=False)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with caplog.at_level("WARNING", logger="hf_varlen_patch"):
        hf_varlen_patch.apply(model)
    assert any("bf16" in r.getMessage() and "16 heads" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("model_type", ["llama", "qwen2_moe", "falcon"])
def test_a_reused_position_buffer_is_never_stale(model_type):
    """Collators may refill one position_ids tensor in place: each forward derives fresh boundaries."""
    model = hf_varlen_patch.apply(tiny_model(model_type)).eval()
    first = make_packed_batch([[5, 9, 3]], model.config.vocab_size, seed=1)
    second = make_packed_batch([[2, 8, 7]], model.config.vocab_size, seed=1)
    buffer = first.position_ids.clone()
    with torch.no_grad():
        model(input_ids=first.input_ids, position_ids=buffer)
        buffer.copy_(second.position_ids)
        reused = model(input_ids=first.input_ids, position_ids=buffer).logits
        fresh = model(input_ids=first.input_ids, position_ids=second.position_ids.clone()).logits
    assert torch.equal(reused, fresh)


def test_a_packed_row_longer_than_a_row_numbered_position_table_says_so():
    """BartForCausalLM numbers the whole row before positions restart: a row past its table raises
    a typed error naming the limit, not a bare IndexError."""
    model = hf_varlen_patch.apply(tiny_model("bart"))
    limit = model.config.max_position_embeddings
    batch = make_packed_batch([[limit // 2 + 50, limit // 2 + 50]], model.config.vocab_size)
    with pytest.raises(hf_varlen_patch.VarlenPatchError, match="max_position_embeddings"):
        model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)


def test_an_unpatched_causal_lm_without_position_ids_still_rejects_them():
    """Only the patched 4.57 BartForCausalLM accepts position_ids; upstream's signature is unchanged."""
    from hf_varlen_patch.patching import accepts_argument

    model = tiny_model("bart")
    if accepts_argument(type(model).forward, "position_ids"):
        return  # transformers 5.x: upstream takes them itself
    batch = make_packed_batch([[5, 9]], model.config.vocab_size)
    with pytest.raises(TypeError):
        model(input_ids=batch.input_ids, position_ids=batch.position_ids)
    hf_varlen_patch.apply(model)
    out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    assert out.logits.shape[:2] == batch.input_ids.shape


@pytest.mark.parametrize("model_type, variant", registered_variants())
def test_a_deep_copy_of_a_patched_model_is_patched_on_its_own_weights(model_type, variant):
    """``copy.deepcopy`` (EMA models, TRL's reference model) of a patched model: the copy runs
    its *own* weights (its wrappers were bound to the copy, not the original), packs exactly, and
    ``unapply`` of either leaves the other patched. (Wrappers that closed over the original
    made the copy run the original's forward.)"""
    import copy

    from hf_varlen_patch.testing import compare_packed, make_packed_batch

    model = tiny_model(model_type, variant).train()
    hf_varlen_patch.apply(model)
    batch = make_packed_batch([[5, 9, 3]], model.config.get_text_config().vocab_size, seed=2)
    ids = batch.sequences[1][None]
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for param in twin.parameters():
            param.mul_(1.01)
        moved = twin(input_ids=ids, use_cache=False).logits
        still = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(before, still) and not torch.equal(before, moved)
    result = compare_packed(twin, batch)
    assert result.ok(1e-5), f"{model_type}/{variant}: {result}"
    hf_varlen_patch.unapply(twin)
    assert not hf_varlen_patch.is_patched(twin) and hf_varlen_patch.is_patched(model)
    assert compare_packed(model, batch).ok(1e-5)


@pytest.mark.parametrize("model_type", ["deepseek_v32", "glm_moe_dsa"])
def test_sparse_attention_is_refused_and_its_route_keeps_the_selection(model_type):
    """DSA layers attend to the ``index_topk`` keys their indexer picks per query, and upstream asks
    the attention implementation's *name* whether to merge that selection into the mask (eager,
    sdpa) or hand it to a sparse kernel. ``apply`` refuses these types (packed sequences longer than
    the selection would need it); on the attention route itself, unpacked calls keep the selection
    (attending to every key instead differs, as the same weights with a wider selection show),
    packed sequences longer than the selection raise, shorter ones (every causal key) are exact."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from hf_varlen_patch.errors import PackedCallError
    from hf_varlen_patch.install import apply_entry
    from hf_varlen_patch.testing import compare_packed, make_packed_batch, tiny_config

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"{model_type} is not in this transformers release")
    config = tiny_config(model_type, index_topk=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(UnsupportedArchitectureError, match="index_topk"):
        hf_varlen_patch.apply(model)
    every_key = AutoModelForCausalLM.from_config(tiny_config(model_type, index_topk=64)).eval()
    every_key.load_state_dict(model.state_dict())
    ids = torch.randint(1, config.vocab_size, (2, 12))
    with torch.no_grad():
        upstream = model(input_ids=ids, use_cache=False).logits
        dense = every_key(input_ids=ids, use_cache=False).logits
        apply_entry(model, hf_varlen_patch.lookup(model_type))  # the route alone, past the refusal
        patched = model(input_ids=ids, use_cache=False).logits
    assert float((dense - upstream).abs().max()) > 1e-3  # the selection matters at these lengths
    assert torch.equal(patched, upstream)
    with pytest.raises(PackedCallError, match="keys its indexer picks"):
        compare_packed(model, make_packed_batch([[3, 9, 4]], config.vocab_size), grads=False)
    assert compare_packed(model, make_packed_batch([[3, 4, 2, 4]], config.vocab_size)).ok(1e-5)
    hf_varlen_patch.unapply(model)
