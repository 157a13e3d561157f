"""Each backend against an independent per-sequence float64 loop; adapters against the
signatures of the kernels they wrap; the auto/named selection rules."""

import inspect
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch

from hf_varlen_patch import BACKENDS, BackendUnavailableError, Boundaries, MalformedBoundariesError, select_backend
from hf_varlen_patch.backends import AUTO_ORDER, AttentionSpec, Backend, flash, flex, register_backend, torch_varlen
from hf_varlen_patch.backends.reference import reference_attention

#: fp32 kernels against the float64 definition (not packed vs separate, which is 1e-5 elsewhere):
#: on this CPU, ~40% of processes take a tanh/exp path that is 3.4e-5 off for the softcap spec.
FP64_TOL = 1e-4

POS = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0], [0, 1, 2, 3, 0, 1, 2, 3, 4, 5] * 2])
SPECS = {
    "causal": AttentionSpec(),
    "window": AttentionSpec(window=3),
    "softcap": AttentionSpec(softcap=0.7),
    "scale": AttentionSpec(scale=0.3),
    "sinks": AttentionSpec(sinks=torch.tensor([0.5, -1.0, 2.0, 0.0])),
    "alibi": AttentionSpec(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625])),
    "bidirectional": AttentionSpec(causal=False),
    "bidirectional_window": AttentionSpec(causal=False, window=2),
}


def naive(q, k, v, cu, spec):
    """Plain per-sequence, per-query attention in float64: the definition, nothing shared."""
    q, k, v = q.double(), k.double(), v.double()
    hq, hk = q.shape[1], k.shape[1]
    out = torch.zeros(q.shape[0], hq, v.shape[-1], dtype=torch.float64)
    scale = spec.scale if spec.scale is not None else q.shape[-1] ** -0.5
    for start, end in zip(cu[:-1], cu[1:]):
        for i in range(start, end):
            for h in range(hq):
                g = h // (hq // hk)
                keys = [
                    j
                    for j in range(start, end)
                    if (not spec.causal or j <= i) and (spec.window is None or abs(i - j) < spec.window)
                ]
                s = torch.stack([q[i, h] @ k[j, g] for j in keys]) * scale
                if spec.softcap:
                    s = torch.tanh(s / spec.softcap) * spec.softcap
                if spec.alibi_slopes is not None:
                    s = s - spec.alibi_slopes[h].double() * torch.tensor(
                        [abs(i - j) for j in keys], dtype=torch.float64
                    )
                if spec.sinks is not None:
                    s = torch.cat([s, spec.sinks[h].double().view(1)])
                p = torch.softmax(s, 0)[: len(keys)]
                out[i, h] = sum(p[n] * v[j, g] for n, j in enumerate(keys))
    return out


def _inputs(seed=0, hq=4, hk=2, d=8):
    gen = torch.Generator().manual_seed(seed)
    n = POS.numel()
    return [torch.randn(n, h, d, generator=gen) for h in (hq, hk, hk)]


@pytest.mark.parametrize("name", list(SPECS))
def test_reference_backend_is_exact(name):
    spec = SPECS[name]
    q, k, v = _inputs()
    b = Boundaries.from_position_ids(POS)
    got = reference_attention(q, k, v, b, spec)
    expected = naive(q, k, v, b.cu_seqlens.tolist(), spec)
    assert (got.double() - expected).abs().max() < FP64_TOL


def test_features_change_the_result():
    """Guards the tests above: each feature really alters the output."""
    q, k, v = _inputs()
    b = Boundaries.from_position_ids(POS)
    base = reference_attention(q, k, v, b, SPECS["causal"])
    for name in ("window", "softcap", "scale", "sinks", "alibi", "bidirectional"):
        assert (reference_attention(q, k, v, b, SPECS[name]) - base).abs().max() > 1e-3, name


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("name", list(SPECS))
def test_flex_backend_forward_matches(name):
    q, k, v = _inputs(1)
    b = Boundaries.from_position_ids(POS)
    with torch.no_grad():
        got = flex.flex_varlen_attention(q, k, v, b, SPECS[name])
    assert (got.double() - naive(q, k, v, b.cu_seqlens.tolist(), SPECS[name])).abs().max() < FP64_TOL


# ------------------------------------------------------------- adapters with fake kernels


def _fake_flash_semantics(q, k, v, cu, causal, left, right, scale, softcap=0.0, alibi=None, sink=None):
    """What flash-attn documents: key j visible to query i iff i-left <= j <= i+right (-1 or None:
    unbounded) and, if causal, j <= i; softcap 0 means off."""
    left = -1 if left is None else left
    right = -1 if right is None else right
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    hq, hk = q.shape[1], k.shape[1]
    cu = cu.tolist()
    for start, end in zip(cu[:-1], cu[1:]):
        for i in range(start, end):
            keys = [
                j
                for j in range(start, end)
                if (not causal or j <= i) and (left < 0 or j >= i - left) and (right < 0 or j <= i + right)
            ]
            for h in range(hq):
                g = h // (hq // hk)
                s = torch.stack([q[i, h].double() @ k[j, g].double() for j in keys]) * scale
                if softcap:
                    s = torch.tanh(s / softcap) * softcap
                if alibi is not None:
                    s = s - alibi[h].double() * torch.tensor([abs(i - j) for j in keys], dtype=torch.float64)
                if sink is not None:
                    s = torch.cat([s, sink[h].double().view(1)])
                p = torch.softmax(s, 0)[: len(keys)]
                out[i, h] = sum(p[n] * v[j, g].double() for n, j in enumerate(keys))
    return out.float()


def fake_fa2(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and isinstance(max_seqlen_q, int)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return _fake_flash_semantics(q, k, v, cu_seqlens_q, causal, *window_size, scale, softcap, alibi_slopes)


def fake_fa4(
    q,
    k,
    v,
    qv=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    min_seqlen_k=None,
    seqused_q=None,
    seqused_k=None,
    gather_kv_indices=None,
    page_table=None,
    softmax_scale=None,
    causal=False,
    window_size=(None, None),
    learnable_sink=None,
    softcap=0.0,
    num_splits=1,
    pack_gqa=None,
    deterministic=False,
    score_mod=None,
    score_mod_bwd=None,
    mask_mod=None,
    block_sparse_tensors=None,
    aux_tensors=None,
    aux_scalars=None,
    return_lse=False,
    scheduler_metadata=None,
    seqlen_k_per_split=None,
    disable_scheduler_metadata=False,
    gather_bwd_recompute_p=False,
    gather_bwd_token_chunk=None,
):
    assert qv is None and isinstance(cu_seqlens_q, torch.Tensor) and isinstance(max_seqlen_q, int)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = _fake_flash_semantics(q, k, v, cu_seqlens_q, causal, *window_size, scale, softcap, None, learnable_sink)
    return out, torch.zeros(q.shape[1], q.shape[0]) if return_lse else None


def fake_fa4_bwd(
    q,
    k,
    v,
    out,
    dout,
    lse,
    softmax_scale=None,
    causal=False,
    softcap=0.0,
    window_size_left=None,
    window_size_right=None,
    m_block_size=64,
    n_block_size=128,
    num_threads=256,
    pack_gqa=False,
    num_stages_Q=2,
    num_stages_dO=2,
    SdP_swapAB=False,
    dKV_swapAB=False,
    dQ_swapAB=False,
    AtomLayoutMSdP=2,
    AtomLayoutNdKV=2,
    AtomLayoutMdQ=2,
    V_in_regs=False,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    seqused_q=None,
    seqused_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    deterministic=False,
    dq=None,
    dk=None,
    dv=None,
    score_mod=None,
    score_mod_bwd=None,
    mask_mod=None,
    aux_tensors=None,
    aux_scalars=None,
    block_sparse_tensors=None,
    dlse=None,
    learnable_sink=None,
):
    """FA4's backward by autograd through the reference (the kernel's maths, not its code)."""
    assert torch.equal(cu_seqlens_q, cu_seqlens_k) and lse.shape == (q.shape[1], q.shape[0])
    assert window_size_right is None or window_size_right == (0 if causal else window_size_left)
    spec = AttentionSpec(
        causal=causal,
        scale=softmax_scale,
        window=None if window_size_left is None else window_size_left + 1,
        softcap=softcap or None,
        sinks=None if learnable_sink is None else learnable_sink.detach().requires_grad_(),
    )
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    b = Boundaries.from_cu_seqlens(cu_seqlens_q, max_seqlen_q, shape=(1, q.shape[0]))

    def grads():
        ref = reference_attention(*inputs, b, spec)
        wrt = inputs + ([spec.sinks] if learnable_sink is not None else [])
        return torch.autograd.grad(ref, wrt, dout)

    # a custom op's implementation runs below autograd; a fresh thread has autograd again
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(grads).result()


#: The real kernels' parameters, in order, as published (the fakes above must declare exactly these,
#: so an adapter that passes by position what a release takes elsewhere fails here, not on a GPU):
#: flash-attn 2.8.3 ``flash_attn.flash_attn_varlen_func``; flash-attn-4 4.0.0b36
#: ``flash_attn.cute.flash_attn_varlen_func`` (read from the wheel's ``interface.py``).
REAL_SIGNATURES = {
    fake_fa2: "q k v cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k dropout_p softmax_scale causal "
    "window_size softcap alibi_slopes deterministic return_attn_probs block_table",
    fake_fa4: "q k v qv cu_seqlens_q cu_seqlens_k max_seqlen_q max_seqlen_k min_seqlen_k seqused_q seqused_k "
    "gather_kv_indices page_table softmax_scale causal window_size learnable_sink softcap num_splits pack_gqa "
    "deterministic score_mod score_mod_bwd mask_mod block_sparse_tensors aux_tensors aux_scalars return_lse "
    "scheduler_metadata seqlen_k_per_split disable_scheduler_metadata gather_bwd_recompute_p gather_bwd_token_chunk",
    fake_fa4_bwd: "q k v out dout lse softmax_scale causal softcap window_size_left window_size_right m_block_size "
    "n_block_size num_threads pack_gqa num_stages_Q num_stages_dO SdP_swapAB dKV_swapAB dQ_swapAB AtomLayoutMSdP "
    "AtomLayoutNdKV AtomLayoutMdQ V_in_regs cu_seqlens_q cu_seqlens_k seqused_q seqused_k max_seqlen_q max_seqlen_k "
    "deterministic dq dk dv score_mod score_mod_bwd mask_mod aux_tensors aux_scalars block_sparse_tensors dlse "
    "learnable_sink",
}


@pytest.mark.parametrize("fake", list(REAL_SIGNATURES), ids=["fa2_2.8.3", "fa4_4.0.0b36", "fa4_bwd_4.0.0b36"])
def test_flash_fakes_declare_the_real_signatures(fake):
    assert list(inspect.signature(fake).parameters) == REAL_SIGNATURES[fake].split()


@contextmanager
def _fake_flash(fn, module="fake", backward=None):
    saved = dict(flash._FOUND)
    flash._FOUND.clear()
    flash._FOUND["found"] = (fn, dict(inspect.signature(fn).parameters), module)
    if backward is not None:
        flash._FOUND["cute_bwd"] = backward
    try:
        yield
    finally:
        flash._FOUND.clear()
        flash._FOUND.update(saved)


@pytest.mark.parametrize(
    "fake, names",
    [
        (fake_fa2, ["causal", "window", "softcap", "scale", "alibi", "bidirectional", "bidirectional_window"]),
        (fake_fa4, ["causal", "window", "softcap", "scale", "sinks"]),
    ],
)
def test_flash_adapter_maps_the_spec(fake, names):
    q, k, v = _inputs(2)
    b = Boundaries.from_position_ids(POS)
    with _fake_flash(fake):
        feats = flash._features()
        for name in names:
            spec = SPECS[name]
            assert spec.features(4, 2) <= feats, name
            got = flash.flash_varlen_attention(q, k, v, b, spec)
            assert (got.double() - naive(q, k, v, b.cu_seqlens.tolist(), spec)).abs().max() < FP64_TOL, name
    assert ("alibi" in feats) == (fake is fake_fa2) and ("sinks" in feats) == (fake is fake_fa4)


def _cute_args(spec, seed=3, d=32):
    q, k, v = (t.requires_grad_() for t in _inputs(seed, d=d))
    b = Boundaries.from_position_ids(POS.reshape(1, -1))
    return q, k, v, b


@pytest.mark.parametrize("name", ["causal", "window", "softcap", "scale", "sinks", "bidirectional_window"])
def test_fa4_runs_as_custom_ops_forward_and_backward(name):
    """FA4 (flash_attn.cute) goes through hf_varlen's custom ops: outputs and gradients (sinks
    included) are the kernel's, the ops pass torch.library.opcheck (schema, fake tensors,
    autograd registration, AOT dispatch with dynamic shapes)."""
    spec = SPECS[name]
    if spec.sinks is not None:
        spec = AttentionSpec(sinks=spec.sinks.clone().requires_grad_())
    q, k, v, b = _cute_args(spec)
    with _fake_flash(fake_fa4, module=flash.CUTE, backward=fake_fa4_bwd):
        got = flash.flash_varlen_attention(q, k, v, b, spec)
        assert (got.double() - naive(q, k, v, b.cu_seqlens.tolist(), spec)).abs().max() < FP64_TOL
        dout = torch.randn_like(got)
        wrt = [q, k, v] + ([spec.sinks] if spec.sinks is not None else [])
        grads = torch.autograd.grad(got, wrt, dout)
        expected = torch.autograd.grad(reference_attention(q, k, v, b, spec), wrt, dout)
        for g, e in zip(grads, expected):
            assert (g - e).abs().max() < 1e-5
        left, right = flash._window(flash._flash()[1], spec)["window_size"]
        args = (
            q,
            k,
            v,
            b.cu_seqlens,
            b.max_seqlen,
            spec.scale or 8**-0.5,
            spec.causal,
            left,
            right,
            float(spec.softcap or 0.0),
            spec.sinks,
        )
        torch.library.opcheck(torch.ops.hf_varlen.flash_cute_varlen_fwd, args)


def test_fa4_custom_op_keeps_one_graph():
    spec = SPECS["window"]
    q, k, v, b = _cute_args(spec)
    with _fake_flash(fake_fa4, module=flash.CUTE, backward=fake_fa4_bwd):
        explained = torch._dynamo.explain(lambda q, k, v: flash.flash_varlen_attention(q, k, v, b, spec) * 2)(q, k, v)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def fake_varlen_211(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)
):
    assert query.shape[1] == key.shape[1], "2.11 has no GQA: the adapter must repeat kv heads"
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    left, right = window_size
    return _fake_flash_semantics(query, key, value, cu_seq_q, right == 0, left, right, scale)


def fake_varlen_213(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
    seqused_k=None,
    block_table=None,
    num_splits=None,
):
    assert enable_gqa == (query.shape[1] != key.shape[1])
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    left, right = window_size
    return _fake_flash_semantics(query, key, value, cu_seq_q, right == 0, left, right, scale)


@pytest.mark.parametrize("fake", [fake_varlen_211, fake_varlen_213])
@pytest.mark.parametrize("name", ["causal", "window", "scale", "bidirectional"])
def test_torch_varlen_adapter_maps_the_spec(monkeypatch, fake, name):
    monkeypatch.setattr(torch_varlen, "_varlen", lambda: (fake, frozenset(inspect.signature(fake).parameters)))
    q, k, v = _inputs(3)
    b = Boundaries.from_position_ids(POS)
    spec = SPECS[name]
    assert spec.features(4, 2) <= torch_varlen._features()
    got = torch_varlen.torch_varlen_attention(q, k, v, b, spec)
    assert (got.double() - naive(q, k, v, b.cu_seqlens.tolist(), spec)).abs().max() < FP64_TOL


def test_torch_varlen_on_this_torch_declares_its_real_signature():
    found = torch_varlen._varlen()
    if found is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    assert "window_size" in found[1] and "sliding_window" in torch_varlen._features()
    assert "softcap" not in torch_varlen._features() and "sinks" not in torch_varlen._features()


# ------------------------------------------------------------------------- selection


@pytest.fixture
def fake_fast_backend(monkeypatch):
    """A pretend fast kernel, first in auto order, that runs on CPU but has no sliding window."""
    backend = Backend(
        name="fake_fast",
        fn=reference_attention,
        features=lambda: frozenset({"causal", "gqa"}),
        availability=lambda device, dtype: None,
    )
    register_backend(backend)
    monkeypatch.setitem(BACKENDS, "fake_fast", backend)
    monkeypatch.setattr("hf_varlen_patch.backends.base.AUTO_ORDER", ["fake_fast", *AUTO_ORDER])
    yield backend
    BACKENDS.pop("fake_fast", None)


def test_auto_uses_the_first_backend_with_every_feature(fake_fast_backend, caplog):
    cpu = torch.device("cpu")
    assert select_backend("auto", cpu, torch.float32, frozenset({"causal", "gqa"})) is fake_fast_backend
    with caplog.at_level(logging.WARNING, logger="hf_varlen_patch"):
        chosen = select_backend("auto", cpu, torch.float32, frozenset({"causal", "sliding_window"}))
        select_backend("auto", cpu, torch.float32, frozenset({"causal", "sliding_window"}))
    assert chosen.name == "sdpa"
    logged = [r.getMessage() for r in caplog.records if "fake_fast" in r.getMessage()]
    assert len(logged) == 1 and "lacks sliding_window" in logged[0]


def test_a_named_backend_lacking_a_feature_raises(fake_fast_backend):
    with pytest.raises(BackendUnavailableError, match="lacks \\['sliding_window'\\]"):
        select_backend("fake_fast", torch.device("cpu"), torch.float32, frozenset({"causal", "sliding_window"}))


def test_auto_on_cpu_fp32_is_the_exact_reference():
    assert select_backend("auto", torch.device("cpu"), torch.float32, frozenset({"causal"})).name == "sdpa"


def test_values_of_another_width_are_never_sent_to_a_backend_without_them(monkeypatch):
    """Multi-head latent attention (values narrower than q/k): torch's varlen_attn raises on it on
    the H100/H200 (``v must have shape (total_k, num_heads_k, head_size_og)``), so the torch backend
    does not declare it and a named request for it is refused."""
    spec = AttentionSpec(causal=True)
    assert "value_head_dim" in spec.features(4, 2, 24, 16)
    assert "value_head_dim" not in spec.features(4, 2, 16, 16)
    monkeypatch.setattr(torch_varlen, "_varlen", lambda: (fake_varlen_213, frozenset()))
    assert "value_head_dim" not in torch_varlen._features()
    assert "value_head_dim" in BACKENDS["sdpa"].features()
    needed = spec.features(4, 2, 24, 16)
    assert select_backend("auto", torch.device("cpu"), torch.float32, needed).name == "sdpa"
    q, k, v = _inputs(4)
    wide = torch.cat([q, q[..., :8]], -1), torch.cat([k, k[..., :8]], -1)
    b = Boundaries.from_position_ids(POS)
    got = BACKENDS["sdpa"].fn(*wide, v, b, spec)  # the reference takes values of another width
    assert got.shape[-1] == v.shape[-1]


def test_auto_takes_the_reference_when_a_kernel_refuses_at_call_time(monkeypatch, caplog):
    """FlexAttention can find only when called that it cannot trace a configuration (vaultgemma's
    softcap on the H200): auto then runs the exact reference, a named backend raises."""
    from hf_varlen_patch import attention

    def refuses(*args, **kwargs):
        raise BackendUnavailableError("cannot run this configuration")

    fake = Backend("fake_refusing", refuses, lambda: frozenset(), lambda device, dtype: None)
    monkeypatch.setattr(attention, "select_backend", lambda name, *a: BACKENDS["sdpa"] if name == "sdpa" else fake)
    flat = _inputs(5)
    q, k, v = (t.view(1, POS.numel(), t.shape[1], -1).transpose(1, 2) for t in flat)
    b = Boundaries.from_position_ids(POS.view(1, -1))
    spec = AttentionSpec(causal=True)
    with caplog.at_level(logging.WARNING, logger="hf_varlen_patch"):
        out = attention.varlen_attention("auto", q, k, v, b, spec)
    ref = BACKENDS["sdpa"].fn(*flat, b, spec)
    assert torch.allclose(out.reshape(ref.shape), ref) and "fake_refusing" in caplog.text
    with pytest.raises(BackendUnavailableError):
        attention.varlen_attention("fake_refusing", q, k, v, b, spec)


def test_fa4_refuses_to_train_heads_its_backward_gets_wrong():
    """Below 32-dim heads FA4 4.0.0b36's gradients are wrong (measured on an H200): a training
    call is refused by name (auto then takes another backend); inference still runs on FA4."""
    spec = SPECS["causal"]
    q, k, v, b = _cute_args(spec, d=16)
    with _fake_flash(fake_fa4, module=flash.CUTE, backward=fake_fa4_bwd):
        with pytest.raises(BackendUnavailableError, match="backward is wrong for 16-dim heads"):
            flash.flash_varlen_attention(q, k, v, b, spec)
        with torch.no_grad():
            got = flash.flash_varlen_attention(q, k, v, b, spec)
    assert (got.double() - naive(q, k, v, b.cu_seqlens.tolist(), spec)).abs().max() < FP64_TOL


def _naive_blocks(q, k, v, boundaries, spec):
    """The definition of bidirectional blocks (transformers' block_sequence_ids over its causal
    mask): within a sequence, j <= i or i and j in one block; a window bounds only the past."""
    q, k, v = q.double(), k.double(), v.double()
    seq, blocks = boundaries.seq_idx.tolist(), boundaries.blocks.tolist()
    scale = q.shape[-1] ** -0.5
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    for i in range(q.shape[0]):
        keys = [
            j
            for j in range(q.shape[0])
            if seq[i] == seq[j]
            and (j <= i or (blocks[i] == blocks[j] and blocks[i] >= 0))
            and (spec.window is None or i - j < spec.window)
        ]
        for h in range(q.shape[1]):
            g = h // (q.shape[1] // k.shape[1])
            p = torch.softmax(torch.stack([q[i, h] @ k[j, g] for j in keys]) * scale, 0)
            out[i, h] = sum(p[n] * v[j, g] for n, j in enumerate(keys))
    return out


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("spec", [AttentionSpec(), AttentionSpec(window=3)], ids=["causal", "window"])
def test_bidirectional_blocks(spec):
    q, k, v = _inputs(2)
    plain = Boundaries.from_position_ids(POS)
    blocks = torch.full((POS.numel(),), -1)
    blocks[2:6] = 0  # inside the first sequence
    blocks[12:17] = 1  # inside the third sequence
    blocks[17:19] = 1  # the same id further on in that sequence, then in the next one: not one block
    blocks[19] = 1
    b = plain.with_blocks(blocks)
    expected = _naive_blocks(q, k, v, b, spec)
    for name, fn in (("sdpa", reference_attention), ("flex", flex.flex_varlen_attention)):
        with torch.no_grad():
            got = fn(q, k, v, b, spec)
        assert (got.double() - expected).abs().max() < FP64_TOL, name
    assert (reference_attention(q, k, v, plain, spec) - reference_attention(q, k, v, b, spec)).abs().max() > 1e-3
    needed = spec.features(4, 2, 8, 8) | {"bidirectional_blocks"}
    assert "bidirectional_blocks" not in torch_varlen._features() and not needed <= flash._features()
    with pytest.raises(MalformedBoundariesError, match="one id per token"):
        plain.with_blocks(blocks[:-1])
