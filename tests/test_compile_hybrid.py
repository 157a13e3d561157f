"""torch.compile on packed hybrids: one graph, few recompiles, the numbers of each sequence alone.

One type per recurrence: short convolution (lfm2), gated delta rule + convolution (qwen3_next,
qwen3_5_text), Mamba-2 SSD + convolution + attention (bamba). Compiled whole, a packed training
step with the collator's keywords is one graph (the routers read the boundaries from the stack
compiled code keeps); compiled block by block inside an eager packed forward, the blocks hand the
boundaries they get as a keyword to the recurrent layers inside them (before: a graph break at every
routed call, where the router read the eager forward's context variable), and share one graph per
kind of block. Counts by a counting backend around ``aot_eager`` and dynamo's break counter;
inductor only where its strides matter (the reference backend's layout, bamba's partial rotary).
"""

import copy
import random

import pytest
import torch
import transformers
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import hf_varlen_patch
from hf_varlen_patch.testing import (
    make_packed_batch,
    max_grad_error,
    max_logits_error,
    run_packed,
    run_separate,
    test_variants,
    tiny_model,
)

ON_4 = transformers.__version__.startswith("4.")
TOL = 1e-5
QWEN3_NEXT = pytest.param(
    "qwen3_next",
    marks=pytest.mark.skipif(
        ON_4,
        reason="4.57's Qwen3NextModel breaks the graph itself: _update_linear_attn_mask branches on "
        "cache_position[0] > 0 and its MoE block loops over nonzero() experts",
    ),
)
QWEN3_5 = pytest.param("qwen3_5_text", marks=pytest.mark.skipif(ON_4, reason="transformers 4.57 has no qwen3_5"))
BAMBA = pytest.param(
    "bamba", marks=pytest.mark.skipif(ON_4, reason="refused on 4.57: its recurrent layers compute inline")
)
HYBRIDS = ["lfm2", QWEN3_NEXT, QWEN3_5, BAMBA]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _collator_inputs(lengths, vocab, seed=0):
    """What ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)`` hands the model."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (1, sum(lengths)), generator=gen)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    longest = max(lengths)
    return dict(input_ids=ids, labels=ids.clone(), cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest,
                max_length_k=longest, use_cache=False)  # fmt: skip


def _step(fn, model, inputs):
    """One training step through ``fn`` (the model or its compiled form): logits, loss, gradients."""
    model.zero_grad(set_to_none=True)
    out = fn(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def _worst(a, b):
    (logits_a, loss_a, grads_a), (logits_b, loss_b, grads_b) = a, b
    assert grads_a.keys() == grads_b.keys()
    return max(
        [float((logits_a - logits_b).abs().max()), float((loss_a - loss_b).abs())]
        + [float((grads_a[n] - grads_b[n]).abs().max()) for n in grads_a]
    )


def _breaks():
    return sum(counters["graph_break"].values()), [str(k)[:300] for k in counters["graph_break"]]


#: the types that also run 20 batches here (each dynamic compile of a delta-rule or SSD twin takes
#: about 20 s on two cores); benchmarks/compile_hybrid_cpu.md has all four over 20 batches
TWENTY_BATCHES = ("lfm2", "qwen3_5_text")


@pytest.mark.parametrize("model_type", HYBRIDS)
def test_packed_hybrid_step_is_one_graph_equal_to_eager_and_to_each_sequence(model_type):
    """Forward and backward of a packed step with the collator's keywords: one graph, no break;
    compiled == eager == each sequence alone (logits, loss, gradients, float32). Then (lfm2,
    qwen3_5_text) 19 batches of new lengths and numbers of sequences compile at most twice more
    (dynamo's automatic dynamic shapes: both change at the second batch, so once here), still
    without a break, and the last equals eager."""
    model = tiny_model(model_type).train()
    vocab = model.config.vocab_size
    batch = make_packed_batch([[5, 9, 3, 11]], vocab, seed=3)
    truth = run_separate(model, batch)
    hf_varlen_patch.apply(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    inputs = _collator_inputs([n for _, _, n in batch.spans], vocab)
    inputs["input_ids"], inputs["labels"] = batch.input_ids, batch.labels

    first = _step(compiled, model, inputs)
    assert counter.frame_count == 1 and _breaks()[0] == 0, (counter.frame_count, _breaks())
    assert _worst(first, _step(model, model, inputs)) < TOL
    logits, loss, grads = first
    for (_, start, n), expected in zip(batch.spans, truth.logits):
        assert (logits[0, start : start + n] - expected).abs().max() < TOL
    assert abs(loss.item() - truth.loss) < TOL  # the mean over every sequence's targets
    assert max(float((grads[name] - truth.grads[name]).abs().max()) for name in truth.grads) < TOL
    if model_type not in TWENTY_BATCHES:
        return

    rng = random.Random(0)
    for i in range(19):
        inputs = _collator_inputs([rng.randint(2, 24) for _ in range((2, 5, 3, 4)[i % 4])], vocab, seed=i)
        last = _step(compiled, model, inputs)
    assert counter.frame_count <= 3 and _breaks()[0] == 0, (counter.frame_count, _breaks())
    assert _worst(last, _step(model, model, inputs)) < TOL


def _blocks(model):
    return [m for m in model.modules() if type(m).__name__ in set(model._no_split_modules or ())]


@pytest.mark.parametrize("model_type", ["lfm2", QWEN3_NEXT])
def test_hybrid_blocks_compiled_alone_take_the_boundaries_without_a_break(model_type):
    """``block.compile()`` on every decoder block, the model's entry eager: the recurrent layers
    inside a block find the boundaries the block got as a keyword (before: 14 breaks in each of
    these twins, one per routed call, reading the eager forward's context); packed == separate.
    (bamba: the next test; qwen3_5_text's blocks are qwen3_next's.)"""
    model = tiny_model(model_type).train()
    batch = make_packed_batch([[5, 9, 3, 11]], model.config.vocab_size, seed=1)
    truth = run_separate(model, batch)
    hf_varlen_patch.apply(model)
    for block in _blocks(model):
        block.compile(backend="aot_eager")
    packed = run_packed(model, batch)
    assert _breaks()[0] == 0, _breaks()
    assert max_logits_error(packed, truth) < TOL
    assert max_grad_error(packed, truth)[0] < TOL


@pytest.mark.skipif(ON_4, reason="bamba is refused on 4.57; its mixers have no kernels hooks to guard there")
def test_blocks_compiled_alone_compile_once_per_kind_not_per_layer():
    """The guard's hooks on every mixer share their ids: six bamba blocks (five Mamba-2, one
    attention) compile once per kind of block and grad mode (4), not once per layer (before: the
    per-layer hook ids reached dynamo's limit of 8 and the rest ran eagerly)."""
    from hf_varlen_patch.equivalence import build_twin

    config = copy.deepcopy(next(iter(test_variants("bamba").values())))
    config.num_hidden_layers, config.attn_layer_indices = 6, [5]
    model = build_twin(config, model_class=transformers.AutoModelForCausalLM, seed=0).train()
    batch = make_packed_batch([[5, 9, 3, 11]], config.vocab_size, seed=1)
    truth = run_separate(model, batch)
    hf_varlen_patch.apply(model)
    counter = CompileCounterWithBackend("aot_eager")
    blocks = _blocks(model)
    assert len(blocks) == 6
    for block in blocks:
        block.compile(backend=counter)
    packed = run_packed(model, batch)  # a forward with gradients and one without (its model loss)
    assert counter.frame_count == 4 and _breaks()[0] == 0, (counter.frame_count, _breaks())
    assert max_logits_error(packed, truth) < TOL
    assert max_grad_error(packed, truth)[0] < TOL


@pytest.mark.skipif(ON_4, reason="bamba is refused on 4.57: its recurrent layers compute inline")
def test_bamba_attention_under_inductor_at_a_second_length():
    """Bamba's partial rotary (a ``cat``) leaves q/k head-major; the reference backend's (T, H, D)
    view of them had a batch stride inductor does not save, AOTAutograd handed the dynamic backward
    the first length's strides, and the second length failed inductor's stride assertion
    ("expected size 4==4, stride 304==272 at dim=1"). Contiguous before the view: both lengths
    equal eager."""
    from hf_varlen_patch.boundaries import Boundaries
    from hf_varlen_patch.context import BOUNDARIES_KWARG

    model = tiny_model("bamba").train()
    hf_varlen_patch.apply(model, backend="sdpa")
    attention = next(m for m in model.modules() if type(m).__name__ == "BambaAttention")
    rotary = model.model.rotary_emb

    def layer(hidden, cu, positions, longest):
        boundaries = Boundaries.from_cu_seqlens(cu, longest, shape=tuple(hidden.shape[:2]), check=False)
        cos_sin = rotary(hidden, positions)
        return attention(hidden, position_embeddings=cos_sin, attention_mask=None, **{BOUNDARIES_KWARG: boundaries})[0]

    compiled = torch.compile(layer, backend="inductor", dynamic=True)
    gen = torch.Generator().manual_seed(0)
    for lengths in ([5, 9, 3], [7, 4, 6, 2]):
        hidden = torch.randn(1, sum(lengths), model.config.hidden_size, generator=gen, requires_grad=True)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        runs = []
        for fn in (compiled, layer):
            attention.zero_grad(set_to_none=True)
            hidden.grad = None
            out = fn(hidden, cu, positions, max(lengths))
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            runs.append([out.detach(), hidden.grad.clone(), *(p.grad.clone() for p in attention.parameters())])
        assert max(float((a - b).abs().max()) for a, b in zip(*runs)) < TOL, lengths


def test_ssd_scan_under_inductor_over_rows_of_several_chunks():
    """The Mamba-2 reference scan over rows of a symbolic number of chunks c, fwd + bwd: with the
    initial state as a padded chunk -1, the (c+1) x (c+1) chunk decay's saved transpose failed
    inductor's stride check at the second length (ValueRangeError [0:-1]); bamba's packed step under
    torch.compile hit it as soon as a row spanned more than one chunk."""
    from hf_varlen_patch.recurrent import torch_ops

    heads, head_dim, state, chunk = 2, 4, 4, 16
    gen = torch.Generator().manual_seed(0)
    A = -torch.rand(heads, generator=gen)

    def loss(x, dt, B, C, seq_idx):
        return torch_ops.chunked_ssd_scan(x, dt, A, B, C, chunk, seq_idx).square().sum()

    compiled = torch.compile(loss, backend="inductor")
    for lengths in ([40, 30], [64, 33, 7]):
        total = sum(lengths)
        inputs = [
            torch.randn(1, total, heads, head_dim, generator=gen),
            torch.rand(1, total, heads, generator=gen),
            torch.randn(1, total, 1, state, generator=gen),
            torch.randn(1, total, 1, state, generator=gen),
        ]
        inputs = [t.requires_grad_() for t in inputs]
        seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
        runs = []
        for fn in (compiled, loss):
            out = fn(*inputs, seq_idx)
            runs.append([out.detach(), *torch.autograd.grad(out, inputs)])
        for got, want in zip(*runs):
            assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max()), lengths


@pytest.mark.parametrize("model_type", ["lfm2", QWEN3_5])
def test_a_kernel_that_breaks_the_graph_in_every_mixer_compiles_once_per_kind_of_call(model_type, monkeypatch):
    """fla's delta rules run from compiled code as graph breaks (``torch.compiler.disable``), one in
    every recurrent mixer; here the torch ops stand in for them, disabled alike, in a 12-layer twin.
    Over ten batches of new lengths: compiled == eager; the router guard, whose hooks then run
    eagerly around mixers compiled on their own, does not mistake them for bypassed (before:
    RouterBypassedError); compiles stop after the third batch (before: the base model's entry, a
    frame of its own after the break, read the boundaries from the context, a global of static
    shape, and recompiled at every length); no frame reaches dynamo's recompile limit (before:
    ``patched``, one code object for every wrapped method, did)."""
    from hf_varlen_patch.recurrent import torch_ops

    for name in ("chunked_delta_rule", "causal_conv1d"):
        monkeypatch.setattr(torch_ops, name, torch.compiler.disable(getattr(torch_ops, name)))
    model = _patched_twin_of_12_layers(model_type)
    compiles, after_three, last, inputs = _compiled_steps(model, 10)
    assert _breaks()[0] > 0, "the stand-in kernels broke no graph: this test would see none of the above"
    assert compiles == after_three, (after_three, compiles)
    assert _worst(last, _step(model, model, inputs)) < TOL


@pytest.mark.skipif(ON_4, reason="transformers 4.57 has no qwen3_5")
def test_the_fla_kernel_path_compiles_once_per_kind_of_call_with_one_cu_seqlens_per_forward(fla_stand_ins):
    """The path the GPU takes with fla's kernels (rows flattened to one cu_seqlens stream, the
    kernels marked ``torch.compiler.disable``), with exact stand-ins for the kernels, in a 12-layer
    qwen3_5_text twin compiled whole: over 8 batches of new lengths compiles stop after the third,
    no frame reaches the recompile limit, every kernel call of a step gets the same cu_seqlens
    (memoised on the boundaries, also in traced code), and the last step equals eager."""

    seen = fla_stand_ins(compiled_like_fla=True)
    model = _patched_twin_of_12_layers("qwen3_5_text")

    def one_cu_seqlens_per_step(i: int) -> None:
        assert len(seen) == 12 and len({id(cu) for cu in seen}) == 1, (i, len(seen))
        seen.clear()

    compiles, after_three, last, inputs = _compiled_steps(model, 8, after_each=one_cu_seqlens_per_step)
    assert _breaks()[0] > 0 and compiles == after_three, (after_three, compiles)
    assert _worst(last, _step(model, model, inputs)) < TOL


def _patched_twin_of_12_layers(model_type: str) -> torch.nn.Module:
    """The type's tiny twin stretched to 12 layers (its layer pattern repeated), patched."""
    from hf_varlen_patch.equivalence import build_twin

    config = copy.deepcopy(next(iter(test_variants(model_type).values())))
    config.num_hidden_layers = 12
    config.layer_types = (list(config.layer_types) * 12)[:12]
    model = build_twin(config, model_class=transformers.AutoModelForCausalLM, seed=0).train()
    hf_varlen_patch.apply(model)
    return model


def _compiled_steps(model: torch.nn.Module, batches: int, after_each=None):
    """Training steps of the compiled model over batches of new lengths, failing at dynamo's
    recompile limit: (compiles in all, compiles after the third batch, the last step, its inputs)."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    rng = random.Random(0)
    vocab = model.config.vocab_size
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for i in range(batches):
            inputs = _collator_inputs([rng.randint(2, 24) for _ in range((2, 5, 3, 4)[i % 4])], vocab, i)
            last = _step(compiled, model, inputs)
            if after_each is not None:
                after_each(i)
            if i == 2:
                after_three = counter.frame_count
    return counter.frame_count, after_three, last, inputs


@pytest.mark.skipif(ON_4, reason="refused on 4.57: bamba's recurrent layers compute inline")
def test_the_ssd_kernel_path_runs_outside_the_graph_and_equals_eager_torch_ops(monkeypatch):
    """The path the GPU takes with mamba_ssm's SSD under torch.compile: ``kernels.kernel`` hands
    compiled code the scan wrapped to run eagerly (a graph break per Mamba-2 layer), which filters
    the router's keywords by the kernel's signature. Here an exact stand-in with
    ``mamba_chunk_scan_combined``'s signature (mamba_ssm 2.3.2) plays the kernel, on CPU: over 4
    batches of new lengths the compiled step runs it outside the graph, is counted, and equals the
    eager step on the torch ops (logits, loss, gradients). A unit test only: the real kernel runs in
    tests/test_gpu.py and scripts/gpu_hybrid.sh."""
    from hf_varlen_patch.recurrent import kernels, torch_ops

    traced = []

    def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                                  seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")),
                                  return_final_states=False, return_varlen_states=False):  # fmt: skip
        assert z is None and cu_seqlens is None and seq_idx.dtype == torch.int32
        traced.append(torch.compiler.is_compiling())
        return torch_ops.chunked_ssd_scan(
            x, dt, A, B, C, chunk_size, seq_idx, D=D, dt_bias=dt_bias, initial_states=initial_states,
            dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=return_final_states,
        )  # fmt: skip

    model = tiny_model("bamba").train()
    hf_varlen_patch.apply(model)
    rng = random.Random(0)
    batches = [
        _collator_inputs([rng.randint(2, 24) for _ in range(n)], model.config.vocab_size, i)
        for i, n in enumerate((3, 2, 4, 5))
    ]
    eager = [_step(model, model, inputs) for inputs in batches]

    monkeypatch.setenv("HF_VARLEN_RECURRENT_KERNELS", "all")
    monkeypatch.setattr(kernels, "_on_cuda", lambda tensors: True)
    monkeypatch.setattr(kernels, "_load", {"ssd_chunk_scan": mamba_chunk_scan_combined}.get)
    kernels.KERNEL_USAGE.clear()
    compiled = torch.compile(model, backend="aot_eager")
    for inputs, want in zip(batches, eager):
        assert _worst(_step(compiled, model, inputs), want) < TOL
    layers = sum(t == "mamba" for t in model.config.layers_block_type)
    assert traced and not any(traced), "the stand-in was traced into, or never called"
    assert kernels.KERNEL_USAGE["ssd_chunk_scan"] == len(traced) >= layers * len(batches)
    assert _breaks()[0] > 0
    kernels.KERNEL_USAGE.clear()
