"""Hybrid and recurrent causal LMs: packed == each sequence alone with weights whose state
survives hundreds of tokens (``long_memory``), where the unpatched model visibly leaks; the
routed functions come and go with ``apply``/``unapply``; checkpoint recomputation keeps the
boundaries; kernel adapters keep the kernels' calling conventions."""

import importlib
import inspect
import sys

import pytest
import torch
import transformers

import hf_varlen_patch
from hf_varlen_patch import recurrent
from hf_varlen_patch.recurrent import kernels, torch_ops
from hf_varlen_patch.registry import REGISTRY
from hf_varlen_patch.testing import compare_packed, long_memory, make_packed_batch, registered_variants, tiny_model

TOL = 1e-5
ON_THIS_LINE = sorted({mt for mt, _ in registered_variants() if REGISTRY[mt].family == "hybrid"})
LAYOUTS = {"one_row": ([[30, 25, 9]], 0), "rows_with_padding": ([[30, 25], [9, 20]], 3)}


def memory_model(model_type):
    return long_memory(tiny_model(model_type))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("model_type", ON_THIS_LINE)
def test_patched_equals_separate_where_upstream_leaks(model_type, layout):
    rows, padding = LAYOUTS[layout]
    model = memory_model(model_type)
    batch = make_packed_batch(rows, model.config.vocab_size, extra_padding=padding, seed=4)
    before = compare_packed(model, batch)
    assert before.max_error > 1e-3, f"the check cannot see a leak in {model_type}: {before}"
    hf_varlen_patch.apply(model)
    after = compare_packed(model, batch)
    assert after.ok(TOL), f"{model_type}: {after}"


#: one type per recurrence, with the op that resets its state
SCANS = {"bamba": "mamba2_chunk_scan", "mamba": "mamba_selective_scan", "qwen3_next": "torch_chunk_gated_delta_rule",
         "kimi_linear": "chunk_kimi_delta_attention"}  # fmt: skip


@pytest.mark.parametrize("model_type", [t for t in SCANS if t in ON_THIS_LINE])
def test_the_scan_reset_is_needed(model_type, monkeypatch):
    """With the convolution fixed but the scan left to upstream, the check still fails: the
    state itself crosses the boundary in these test weights."""
    model = memory_model(model_type)
    monkeypatch.setitem(recurrent.RECURRENT_OPS, SCANS[model_type], lambda b, upstream, call, m: upstream(**call))
    hf_varlen_patch.apply(model)
    batch = make_packed_batch([[30, 25]], model.config.vocab_size, seed=1)
    assert compare_packed(model, batch).max_error > 10 * TOL  # fails the check the patched model passes


def _modeling_of(model):
    return sys.modules[type(model.base_model).__module__]


@pytest.mark.skipif(transformers.__version__.startswith("4."), reason="routes module functions on transformers 5.x")
def test_routes_come_and_go_with_apply():
    module = importlib.import_module("transformers.models.bamba.modeling_bamba")
    before = module.mamba2_chunk_scan  # a router already if another test's model is patched
    original = getattr(before, "__wrapped__", before) if hasattr(before, "hf_varlen_route") else before
    first, second, bystander = (memory_model("bamba") for _ in range(3))
    batch = make_packed_batch([[12, 9]], first.config.vocab_size)
    with torch.no_grad():
        expected = bystander(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    hf_varlen_patch.apply(first)
    hf_varlen_patch.apply(second)
    assert module.mamba2_chunk_scan is not original and module.mamba2_chunk_scan.__wrapped__ is original
    with torch.no_grad():  # an unpatched model of the same file still runs upstream's code exactly
        again = bystander(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    assert torch.equal(again, expected)
    hf_varlen_patch.unapply(first)
    assert module.mamba2_chunk_scan is not original  # still in use by the second model
    assert compare_packed(second, batch).ok(TOL)
    hf_varlen_patch.unapply(second)
    assert module.mamba2_chunk_scan is before  # upstream's own, once no patched model uses it


CHECKPOINTED = [t for t in ("jamba", "qwen3_next", "mamba", "lfm2", "bamba") if t in ON_THIS_LINE]


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("model_type", CHECKPOINTED)
def test_gradient_checkpointing_keeps_the_boundaries(model_type, reentrant):
    model = memory_model(model_type)
    hf_varlen_patch.apply(model)  # checkpointing enabled after apply, as Trainer does
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    batch = make_packed_batch([[20, 14], [9, 21]], model.config.vocab_size, extra_padding=2, seed=2)
    for _ in range(2):  # the first call installs the checkpoint function, the second reuses it
        result = compare_packed(model, batch)
        assert result.ok(TOL), result
    hf_varlen_patch.unapply(model)
    assert not any("Carrying" in type(vars(m).get("_gradient_checkpointing_func")).__name__ for m in model.modules())


@pytest.mark.parametrize("model_type", [t for t in ("bamba", "qwen3_next", "lfm2") if t in ON_THIS_LINE])
def test_collator_seq_idx_and_cu_seq_lens(model_type):
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True), the path
    transformers documents for these models, runs on CPU after apply and matches separate runs."""
    from transformers import DataCollatorWithFlattening

    model = memory_model(model_type).eval()
    hf_varlen_patch.apply(model)
    batch = make_packed_batch([[17, 4, 23]], model.config.vocab_size, seed=6)
    features = [{"input_ids": s.tolist()} for s in batch.sequences]
    try:
        collate = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_seq_idx=True, return_tensors="pt")
    except TypeError:
        collate = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")
    collated = collate(features)
    with torch.no_grad():
        ref = torch.cat([model(input_ids=s[None], use_cache=False).logits[0] for s in batch.sequences])
        out = model(**collated, use_cache=False).logits[0]
    assert (out - ref).abs().max() <= TOL


# ------------------------------------------------------------------ kernel adapters (fakes hold the real signatures)


def fake_chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                                use_qk_l2norm_in_kernel=False, use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False,
                                state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None, chunk_indices=None,
                                cp_context=None, **kwargs):  # fmt: skip
    """flash-linear-attention 0.5's signature and rules (batch 1 with cu_seqlens, one state per
    sequence), computed by the exact torch op."""
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError("The batch size is expected to be 1 when using `cu_seqlens`.")
    assert cu_seqlens.dtype == torch.int64
    n = cu_seqlens.numel() - 1
    assert initial_state is None or initial_state.shape[0] == n
    ids = torch.repeat_interleave(torch.arange(n), (cu_seqlens[1:] - cu_seqlens[:-1]))[None]
    outs, finals = [], []
    for i in range(n):  # the fake's own per-sequence loop (the real kernel is one launch)
        s, e = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
        o, f = torch_ops.chunked_delta_rule(
            q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e], ids[:, s:e] * 0,
            initial_state=None if initial_state is None else initial_state[i : i + 1],
            output_final_state=True, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        )  # fmt: skip
        outs.append(o)
        finals.append(f)
    return torch.cat(outs, dim=1), (torch.cat(finals) if output_final_state else None)


#: fla.ops.gated_delta_rule.chunk_gated_delta_rule's parameters in flash-linear-attention (fla-core) 0.6.0,
#: read from the wheel that ran on the GPU machine
REAL_FLA_PARAMETERS = ["q", "k", "v", "g", "beta", "scale", "initial_state", "output_final_state",
                       "use_qk_l2norm_in_kernel", "use_beta_sigmoid_in_kernel", "allow_neg_eigval", "state_v_first",
                       "cu_seqlens", "cu_seqlens_cpu", "chunk_indices", "cp_context", "kwargs"]  # fmt: skip


def test_fake_fla_keeps_the_real_signature():
    assert list(inspect.signature(fake_chunk_gated_delta_rule).parameters) == REAL_FLA_PARAMETERS
    if kernels._load("gated_delta_rule") is not None:  # where fla is installed, against the real one
        assert list(inspect.signature(kernels._load("gated_delta_rule")).parameters) == REAL_FLA_PARAMETERS


@pytest.mark.parametrize("model_type", [t for t in ("qwen3_next", "olmo_hybrid") if t in ON_THIS_LINE])
def test_delta_rule_kernel_adapter_flattens_rows(model_type, monkeypatch):
    model = memory_model(model_type)
    hf_varlen_patch.apply(model)
    batch = make_packed_batch([[14, 9], [6, 17]], model.config.vocab_size, seed=3)
    reference = compare_packed(model, batch)
    calls = []

    def fake_kernel(name, *tensors):
        if name == "gated_delta_rule":
            calls.append(name)
            return fake_chunk_gated_delta_rule
        return None

    monkeypatch.setattr(kernels, "kernel", fake_kernel)
    through_kernel = compare_packed(model, batch)
    assert calls and through_kernel.ok(TOL) and reference.ok(TOL), (through_kernel, reference)


def test_recurrent_kernels_switch_off(monkeypatch):
    monkeypatch.setenv("HF_VARLEN_RECURRENT_KERNELS", "0")
    assert kernels.kernel("causal_conv1d", torch.zeros(1)) is None


def _callables(obj):
    return {name: value for name, value in vars(obj).items() if callable(value)}


@pytest.mark.parametrize("model_type", [t for t in ("qwen3_next", "lfm2") if t in ON_THIS_LINE])
def test_unapply_restores_the_model_and_its_modeling_file(model_type):
    model = memory_model(model_type)
    module = _modeling_of(model)
    file_before = _callables(module)
    layers_before = [_callables(m) for m in model.modules()]
    hf_varlen_patch.apply(model)
    assert _callables(module) != file_before or any(_callables(m) != b for m, b in zip(model.modules(), layers_before))
    hf_varlen_patch.unapply(model)
    assert _callables(module) == file_before
    assert [_callables(m) for m in model.modules()] == layers_before
