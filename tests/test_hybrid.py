"""Hybrid and recurrent causal LMs: packed == each sequence alone with weights whose state
survives hundreds of tokens (``long_memory``), where the unpatched model visibly leaks; the
routed functions come and go with ``apply``/``unapply``; checkpoint recomputation keeps the
boundaries; kernel adapters keep the kernels' calling conventions; routers read upstream's calls
through its signature (positional, wrapped), and a hub kernel that would bypass them is refused."""

import functools
import importlib
import importlib.util
import inspect
import sys
import types

import pytest
import torch
import transformers
from packaging.version import Version

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


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: the kernel choice without a GPU."""

    @property
    def is_cuda(self):
        return True


def test_compiled_code_calls_the_scan_kernels_outside_the_graph(monkeypatch):
    """While dynamo traces, the scan kernels come wrapped to run eagerly (torch.compiler.disable),
    counted when they run; the short convolutions give way to the torch ops, which compile into
    the graph."""
    monkeypatch.setenv("HF_VARLEN_RECURRENT_KERNELS", "all")
    monkeypatch.setattr(kernels, "_load", lambda name: name)
    x = torch.zeros(1).as_subclass(_OnCuda)
    kernels.KERNEL_USAGE.clear()
    assert kernels.kernel("fla_causal_conv1d", x) == "fla_causal_conv1d"
    assert kernels.kernel("gated_delta_rule", x) == "gated_delta_rule"
    assert dict(kernels.KERNEL_USAGE) == {"fla_causal_conv1d": 1, "gated_delta_rule": 1}
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert kernels.kernel("fla_causal_conv1d", x) is None and kernels.kernel("causal_conv1d", x) is None
    for name in ("gated_delta_rule", "kda", "ssd_chunk_scan"):
        assert kernels.kernel(name, x) is kernels._OUTSIDE_THE_GRAPH[name]
    assert dict(kernels.KERNEL_USAGE) == {"fla_causal_conv1d": 1, "gated_delta_rule": 1}
    kernels.KERNEL_USAGE.clear()


def test_a_scan_kernel_under_torch_compile_is_one_graph_break_and_runs(monkeypatch):
    """Under dynamo the (stand-in) SSD kernel runs eagerly between two graphs, with the keyword
    arguments its signature takes, and is counted; without the wrapper dynamo would trace into it."""
    traced_into = []

    def fake_ssd(x, dt, seq_idx=None):
        traced_into.append(torch.compiler.is_compiling())
        return x * dt + seq_idx

    monkeypatch.setenv("HF_VARLEN_RECURRENT_KERNELS", "all")
    monkeypatch.setattr(kernels, "_load", lambda name: fake_ssd)
    monkeypatch.setattr(kernels, "_on_cuda", lambda tensors: True)

    def step(x):
        scan = kernels.kernel("ssd_chunk_scan", x)
        y = kernels.call_with_supported(scan, x.sin(), 2.0, seq_idx=torch.ones_like(x), not_taken=1)
        return y.cos()

    kernels.KERNEL_USAGE.clear()
    torch._dynamo.reset()
    x = torch.randn(5)
    explained = torch._dynamo.explain(step)(x)
    assert explained.graph_break_count == 1, explained.break_reasons
    assert torch.equal(torch.compile(step, backend="eager")(x), (x.sin() * 2 + 1).cos())
    assert traced_into and not any(traced_into)
    assert kernels.KERNEL_USAGE["ssd_chunk_scan"] >= 2
    kernels.KERNEL_USAGE.clear()
    torch._dynamo.reset()


def test_verified_kernels_name_known_kernels_and_their_own_package():
    """Every VERIFIED entry is a kernel the routers know, and its stack names the package it comes from."""
    assert set(kernels.VERIFIED) <= set(kernels.KERNELS)
    for name, verified in kernels.VERIFIED.items():
        assert kernels.KERNELS[name][0].split(".")[0] in verified.versions, name
        assert verified.device


def test_a_verified_kernel_is_taken_by_default_only_on_the_stack_it_passed_on(monkeypatch, caplog):
    """``auto`` takes a verified kernel where the installed versions are at least the checked ones;
    on an older stack the torch ops run and one warning names what to upgrade; ``all`` takes any."""
    installed = f"{torch.__version__.split('+')[0]}"
    monkeypatch.setattr(kernels, "VERIFIED", {
        "gated_delta_rule": kernels.VerifiedOn({"torch": installed}, "test"),
        "kda": kernels.VerifiedOn({"torch": "999.0", "no_such_module_here": "1.0"}, "test"),
    })  # fmt: skip
    monkeypatch.setattr(kernels, "_load", lambda name: lambda *a, **k: None)
    kernels._verified_here.cache_clear()
    monkeypatch.delenv("HF_VARLEN_RECURRENT_KERNELS", raising=False)
    try:
        assert kernels.VERIFIED["kda"].missing() == [
            f"torch {torch.__version__} < 999.0",
            "no_such_module_here missing < 1.0",
        ]
        with caplog.at_level("WARNING", logger="hf_varlen_patch"):
            assert kernels.kernels_enabled("gated_delta_rule")
            assert not kernels.kernels_enabled("kda") and not kernels.kernels_enabled("kda")
            assert not kernels.kernels_enabled("causal_conv1d")  # never verified
        warnings = [r.getMessage() for r in caplog.records if "kda" in r.getMessage()]
        assert len(warnings) == 1 and "torch" in warnings[0] and "HF_VARLEN_RECURRENT_KERNELS=all" in warnings[0]
        monkeypatch.setenv("HF_VARLEN_RECURRENT_KERNELS", "all")
        assert kernels.kernels_enabled("kda") and kernels.kernels_enabled("causal_conv1d")
        assert kernels.kernel("kda", torch.zeros(1)) is None  # CPU tensors never reach a kernel
    finally:
        kernels._verified_here.cache_clear()


def test_a_package_whose_import_fails_is_versioned_by_its_metadata(monkeypatch):
    """mamba_ssm's ``__init__`` imports its CUDA selective scan: where that extension is missing, its
    Triton SSD still imports, and the stack check reads the version from the installed metadata."""
    real = importlib.import_module

    def failing(name, *args, **kwargs):
        if name == "pytest":
            raise ImportError("selective_scan_cuda: cannot open shared object file")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(kernels.importlib, "import_module", failing)
    assert kernels._version("pytest") == pytest.__version__
    assert kernels._version("no_such_module_here") is None


@pytest.mark.parametrize("model_type", [t for t in ("qwen3_next", "qwen3_5_text") if t in ON_THIS_LINE])
def test_fla_kernels_get_one_cu_seqlens_per_forward_and_pack_exactly(model_type, fla_stand_ins):
    """The kernel path's flattening (rows -> one cu_seqlens stream -> rows), on CPU with exact
    stand-ins for fla's kernels: packed == each sequence alone, logits and gradients, over two
    padded rows. Every kernel call of a packed forward and backward gets the same cu_seqlens tensor:
    fla memoises its chunk indices by that tensor's identity, and computing them reads the device
    (a sync); a fresh ``.to(torch.int64)`` per layer (before) synced in every layer."""
    seen = fla_stand_ins()
    model = memory_model(model_type)
    batch = make_packed_batch([[30, 25], [9, 20]], model.config.vocab_size, extra_padding=3, seed=2)
    hf_varlen_patch.apply(model)
    result = compare_packed(model, batch)
    assert result.ok(TOL), f"{model_type}: {result}"
    seen.clear()
    out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, labels=batch.labels, use_cache=False)
    out.loss.backward()
    layers = sum(1 for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet"))
    # a delta rule per layer, and a convolution where it is a routed function (5.x; 4.57 convolves with nn.Conv1d)
    assert layers and len(seen) in (layers, 2 * layers), (layers, len(seen))
    assert len({id(cu) for cu in seen}) == 1, f"{len({id(cu) for cu in seen})} cu_seqlens tensors in one forward"


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


# ------------------------------------------------------------------ routers bind upstream's signature


def _row_conv(hidden_states, weight, bias=None, activation=None, **kwargs):
    """An upstream-like ``causal_conv1d_fn``: one causal depthwise convolution over the whole row."""
    out = torch.nn.functional.conv1d(hidden_states, weight[:, None], bias, padding=weight.shape[-1] - 1,
                                     groups=hidden_states.shape[1])[..., : hidden_states.shape[-1]]  # fmt: skip
    return torch.nn.functional.silu(out) if activation == "silu" else out


def _functools_wrapper(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapped


def _function_module(fn):
    """What the ``kernels`` package makes of a function (``use_kernel_forward_from_hub``): an
    ``nn.Module`` instance whose ``forward`` carries the function's signature after ``self``."""

    class Func(torch.nn.Module):
        def forward(self, *args, **kwargs):
            return fn(*args, **kwargs)

    own = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    Func.forward.__signature__ = inspect.signature(fn).replace(
        parameters=[own, *inspect.signature(fn).parameters.values()]
    )
    return Func()


WRAPPERS = {"plain": lambda fn: fn, "functools": _functools_wrapper, "function_module": _function_module}
if importlib.util.find_spec("kernels") is not None:  # transformers 5.25's own decorator, where installed
    WRAPPERS["kernels_hub"] = lambda fn: __import__("kernels").use_kernel_forward_from_hub("causal_conv1d_fn")(fn)


def _fake_modeling(upstream):
    module = types.ModuleType(f"fake_modeling_{id(upstream)}")
    module.causal_conv1d_fn = upstream
    return module


def _packed_conv_case():
    from hf_varlen_patch.boundaries import Boundaries

    lengths = [5, 9, 3]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, sum(lengths), generator=generator)
    weight, bias = torch.randn(6, 4, generator=generator), torch.randn(6, generator=generator)
    expected, start = [], 0
    for n in lengths:  # each sequence alone
        expected.append(_row_conv(x[..., start : start + n], weight, bias, "silu"))
        start += n
    return Boundaries.from_position_ids(positions), x, weight, bias, torch.cat(expected, dim=-1)


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_router_reads_a_positional_call_through_any_wrapper(wrapper):
    """transformers 5.25 calls ``causal_conv1d_fn(hidden_states, weight, bias, activation=...)``
    positionally, through the ``kernels`` function module: the router reads it by upstream's
    parameter names and resets at every sequence start."""
    from hf_varlen_patch.attention import BOUNDARIES_KWARG
    from hf_varlen_patch.patching import Patcher

    boundaries, x, weight, bias, expected = _packed_conv_case()
    module = _fake_modeling(WRAPPERS[wrapper](_row_conv))
    patcher = Patcher()
    assert recurrent.route_recurrent_functions(patcher, module) == ["causal_conv1d_fn"]
    try:
        routed = module.causal_conv1d_fn(x, weight, bias, activation="silu", **{BOUNDARIES_KWARG: boundaries})
        whole_row = module.causal_conv1d_fn(x, weight, bias, "silu")  # unpacked: upstream's own result
    finally:
        patcher.undo()
    torch.testing.assert_close(routed, expected)
    assert (whole_row - expected).abs().max() > 1e-2  # the row conv leaks: the reset is what the test sees
    torch.testing.assert_close(whole_row, _row_conv(x, weight, bias, "silu"))


def test_a_renamed_parameter_is_a_typed_error_naming_it():
    from hf_varlen_patch.attention import BOUNDARIES_KWARG
    from hf_varlen_patch.patching import Patcher

    def causal_conv1d_fn(inputs, weight, bias=None, activation=None):
        return _row_conv(inputs, weight, bias, activation)

    boundaries, x, weight, bias, _ = _packed_conv_case()
    module = _fake_modeling(causal_conv1d_fn)
    patcher = Patcher()
    recurrent.route_recurrent_functions(patcher, module)
    try:
        with pytest.raises(recurrent.UnroutableCallError, match="causal_conv1d_fn.*'hidden_states'"):
            module.causal_conv1d_fn(x, weight, bias, **{BOUNDARIES_KWARG: boundaries})
        with pytest.raises(recurrent.UnroutableCallError, match="does not bind"):
            module.causal_conv1d_fn(x, weight, bias, "silu", 5, **{BOUNDARIES_KWARG: boundaries})
    finally:
        patcher.undo()


def test_a_wrapper_that_hides_the_signature_is_refused_when_routed():
    from hf_varlen_patch.patching import Patcher

    def opaque(*args, **kwargs):  # no __wrapped__: nothing says which argument is which
        return _row_conv(*args, **kwargs)

    module = _fake_modeling(opaque)
    with pytest.raises(recurrent.UnroutableCallError, match="causal_conv1d_fn"):
        recurrent.route_recurrent_functions(Patcher(), module)
    assert module.causal_conv1d_fn is opaque


#: what the boundary-aware ops read from each routed function, by transformers' parameter names
OP_PARAMETERS = {
    "causal_conv1d_fn": {"hidden_states", "weight", "bias", "activation"},
    "mamba2_chunk_scan": {"hidden_states", "dt", "A", "B", "C", "chunk_size"},
    "mamba2_split_conv1d_scan_combined": {"zxbcdt"},
    "mamba_selective_scan": {"hidden_states", "dt", "A", "B", "C"},
    "torch_chunk_gated_delta_rule": {"query", "key", "value", "g", "beta"},
    "chunk_kimi_delta_attention": {"query", "key", "value", "g", "beta"},
}


@pytest.mark.skipif(transformers.__version__.startswith("4."), reason="routes module functions on transformers 5.x")
@pytest.mark.parametrize("model_type", ON_THIS_LINE)
def test_every_routed_function_names_what_its_op_reads(model_type):
    """Upstream's signatures (through the kernels wrappers) hold the parameters the ops read, on
    every registered hybrid of this release: a rename fails here, not in a user's forward."""
    from hf_varlen_patch.recurrent import _ALIASES

    modeling = importlib.import_module(type(tiny_model(model_type).base_model).__module__)
    assert set(OP_PARAMETERS) == set(recurrent.RECURRENT_OPS) - {"mamba_inner_fn"}
    for name in recurrent.routed_functions(modeling):
        upstream = getattr(modeling, name)
        upstream = getattr(upstream, "__wrapped__", upstream) if hasattr(upstream, "hf_varlen_route") else upstream
        names = {_ALIASES.get(p, p) for p in recurrent.upstream_signature(upstream, name).parameters}
        assert OP_PARAMETERS.get(name, set()) <= names, (model_type, name, names)


# ------------------------------------------------------------------ hub kernels cannot bypass the routers

KERNELIZED = [t for t in ("bamba", "qwen3_next", "mamba", "lfm2") if t in ON_THIS_LINE]


def _mixers(model):
    return [m for m in model.modules() if "_kernel_funcs" in vars(m) and "causal_conv1d_forward" in m._kernel_funcs]


def _kernelize(func_module, forward):
    """What ``kernels.kernelize`` does to a function module it finds a hub kernel for
    (``kernels._internals.layer.layer._replace_forward``): the instance's forward and its repo."""
    func_module.forward = types.MethodType(forward, func_module)
    func_module.__dict__["_kernel_repo"] = "kernels-community/fake-conv"


@pytest.mark.skipif(Version(transformers.__version__) < Version("5.25"), reason="kernels function modules: 5.25+")
@pytest.mark.parametrize("model_type", KERNELIZED)
def test_a_hub_kernel_around_a_routed_function_is_refused(model_type):
    """A hub kernel in place of ``causal_conv1d_forward`` convolves the whole row without calling
    the routed ``causal_conv1d_fn``: the packed forward raises instead of leaking."""
    model = memory_model(model_type)
    hf_varlen_patch.apply(model)
    batch = make_packed_batch([[30, 25]], model.config.vocab_size, seed=1)
    assert compare_packed(model, batch).ok(TOL)
    calls = []

    def hub_conv_forward(self, conv1d, hidden_states, cache, layer_idx, activation=None, **kwargs):
        calls.append(layer_idx)
        return _row_conv(hidden_states, conv1d.weight[:, 0], conv1d.bias, activation)

    for mixer in _mixers(model):
        _kernelize(mixer._kernel_funcs["causal_conv1d_forward"], hub_conv_forward)
    with pytest.raises(recurrent.RouterBypassedError, match="causal_conv1d_forward.*fake-conv"):
        compare_packed(model, batch)
    calls.clear()
    with torch.no_grad():  # unpacked calls run the hub kernel, as upstream would
        model(input_ids=batch.sequences[0][None], use_cache=False)
    assert calls
    for mixer in _mixers(model):  # without the guard this is the silent leak it stops
        recurrent._GuardUser(mixer)()
    assert compare_packed(model, batch).max_error > 10 * TOL


@pytest.mark.skipif(Version(transformers.__version__) < Version("5.25"), reason="kernels function modules: 5.25+")
def test_a_mixer_that_reaches_no_router_is_refused():
    """A whole mixer replaced (a layer-level hub kernel, or code that no longer calls the routed
    functions): its eager packed forward reached no router, so it raises."""
    model = memory_model("qwen3_next")
    hf_varlen_patch.apply(model)
    for mixer in _mixers(model):
        mixer.forward = types.MethodType(lambda self, hidden_states, *args, **kwargs: hidden_states, mixer)
    batch = make_packed_batch([[12, 9]], model.config.vocab_size, seed=1)
    with pytest.raises(recurrent.RouterBypassedError, match="reached none of the boundary-aware functions"):
        compare_packed(model, batch)
