"""torch.compile on patched models: one graph, few recompiles, the same numbers as eager.

Graph breaks are counted by ``torch._dynamo.explain`` (dynamo's own count); compiles over new
batch shapes by a counting backend around ``aot_eager``, which also runs the fake implementations
and the registered backward of the engine's custom ops. ``scripts/compile_check.py`` runs the
same check over every registered type (and on the GPU with inductor and the real kernels).
"""

import random
import warnings

import pytest
import torch
import transformers
from torch._dynamo.testing import CompileCounterWithBackend

import hf_varlen_patch
from hf_varlen_patch.testing import make_packed_batch, run_separate, test_variants, tiny_model

#: one per way boundaries reach attention: kwargs (llama), absolute positions (gpt2), sliding
#: window + softcap alternation (gemma2), ALiBi (bloom), a recurrent hybrid (qwen3_next; on 4.57
#: upstream's own ``_update_linear_attn_mask`` branches on tensor values, a break of its own)
FAMILIES = ["llama", "gpt2", "gemma2", "bloom"] + (["qwen3_next"] if transformers.__version__ >= "5" else [])


def _model(model_type, **kwargs):
    variant = next(iter(test_variants(model_type)))
    return tiny_model(model_type, variant).train(), variant


def _collator_batch(lengths, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (1, sum(lengths)), generator=gen)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return dict(
        input_ids=ids,
        labels=ids.clone(),
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=max(lengths),
        max_length_k=max(lengths),
        use_cache=False,
    )


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_collator_kwargs_compile_to_one_graph(model_type):
    """With the collator's cu_seq_lens the whole packed forward, loss included, is one graph."""
    model, _ = _model(model_type)
    hf_varlen_patch.apply(model, backend="auto")
    explained = torch._dynamo.explain(model)(**_collator_batch([5, 9, 3], model.config.vocab_size))
    assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
    assert explained.graph_count == 1


def test_the_unpatched_model_breaks_where_the_patch_does_not():
    """The count can fail: the same check sees upstream GPT-2's break (its loss lookup logs)."""
    model, _ = _model("gpt2")
    explained = torch._dynamo.explain(model)(**_collator_batch([5, 9, 3], model.config.vocab_size))
    assert explained.graph_break_count >= 1


def test_position_ids_alone_break_once_at_the_entry():
    """Packing read from position_ids needs the host: one break, before any layer runs."""
    model, _ = _model("llama")
    hf_varlen_patch.apply(model)
    batch = make_packed_batch([[5, 9, 3]], model.config.vocab_size)
    explained = torch._dynamo.explain(model)(
        input_ids=batch.input_ids, position_ids=batch.position_ids, labels=batch.labels, use_cache=False
    )
    assert explained.graph_break_count == 1 and explained.graph_count == 2
    reasons = " ".join(str(r.reason) for r in explained.break_reasons)  # dynamo does not always list it
    assert not reasons or "position_ids" in reasons


def test_no_dynamo_warnings_from_the_engine():
    """Backend lookups inside a traced forward used functools caches, which dynamo warns about."""
    torch._dynamo.utils.warn_once_cache.clear()
    model, _ = _model("llama")
    hf_varlen_patch.apply(model, backend="auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch._dynamo.explain(model)(**_collator_batch([5, 9, 3], model.config.vocab_size))
    assert not [
        str(w.message)[:200] for w in caught if "hf_varlen_patch" in (w.filename or "") or "lru_cache" in str(w.message)
    ]


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_twenty_batches_of_new_lengths_compile_at_most_three_times(model_type):
    """The first shapes, then one dynamic graph (new row length, new number of sequences): at most
    two recompiles over 20 batches; the compiled steps' losses and gradients are eager's."""
    model, _ = _model(model_type)
    hf_varlen_patch.apply(model, backend="auto", check_inputs=True)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    rng = random.Random(0)
    vocab = model.config.vocab_size
    batches = [_collator_batch([rng.randint(2, 24) for _ in range(rng.randint(2, 5))], vocab, i) for i in range(20)]
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss = compiled(**batch).loss
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        eager = model(**batch).loss
        eager.backward()
        assert torch.allclose(loss, eager, atol=1e-6, rtol=0)
        assert max((a - p.grad).abs().max().item() for a, p in zip(grads, model.parameters())) < 1e-6
    assert counter.frame_count <= 3, counter.frame_count


def test_compiled_packed_equals_each_sequence_alone():
    """Equivalence, compiled: logits and gradients of the compiled packed step against each
    sequence run alone (eager, unpatched), fp32."""
    model, _ = _model("llama")
    batch = make_packed_batch([[5, 9, 3, 11]], model.config.vocab_size, seed=3)
    truth = run_separate(model, batch)
    hf_varlen_patch.apply(model)
    compiled = torch.compile(model, backend="aot_eager")
    lengths = [n for _, _, n in batch.spans]
    inputs = _collator_batch(lengths, model.config.vocab_size)
    inputs["input_ids"], inputs["labels"] = batch.input_ids, batch.labels
    model.zero_grad(set_to_none=True)
    out = compiled(**inputs)
    out.loss.backward()  # the mean over every sequence's targets, as the separate runs average
    logits = out.logits[0]
    for (_, start, n), expected in zip(batch.spans, truth.logits):
        assert (logits[start : start + n] - expected).abs().max() < 1e-5
    assert abs(out.loss.item() - truth.loss) < 1e-5
    for name, param in model.named_parameters():
        assert (param.grad - truth.grads[name]).abs().max() < 1e-5, name


def test_bad_collator_offsets_raise_inside_a_compiled_graph():
    """check_inputs holds under torch.compile: the validation is a custom op in the graph."""
    model, _ = _model("llama")
    hf_varlen_patch.apply(model, check_inputs=True)
    compiled = torch.compile(model, backend="aot_eager")
    batch = _collator_batch([5, 9, 3], model.config.vocab_size)
    batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = torch.tensor([0, 5, 14, 16], dtype=torch.int32)
    with pytest.raises(hf_varlen_patch.MalformedBoundariesError, match="ends at 16"):
        compiled(**batch)


@pytest.mark.parametrize("checkpointing", [None, True, False], ids=["plain", "reentrant", "non-reentrant"])
@pytest.mark.parametrize("model_type", ["bloom", "gpt_neo", "llama"])
def test_compiled_blocks_inside_an_eager_packed_forward(model_type, checkpointing):
    """``layer.compile()`` on each decoder block while the model's entry runs eagerly: the blocks
    of families whose boundaries travel in the context (BLOOM's ALiBi, GPT-Neo's local attention)
    still find them, also when checkpointing recomputes them (before: errors of 1.2 and 0.38)."""
    from hf_varlen_patch.testing import max_grad_error, max_logits_error, run_packed

    model, _ = _model(model_type)
    batch = make_packed_batch([[5, 9, 3, 11]], model.config.vocab_size, seed=1)
    truth = run_separate(model, batch)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing})
    hf_varlen_patch.apply(model)
    blocks = [m for m in model.modules() if type(m).__name__ in set(model._no_split_modules or ())]
    assert blocks
    for block in blocks:
        block.compile(backend="aot_eager")
    packed = run_packed(model, batch)
    assert max_logits_error(packed, truth) < 1e-5
    assert max_grad_error(packed, truth)[0] < 1e-5


def test_boundaries_never_search_a_sliced_tensor_under_compile():
    """Inductor's Triton searchsorted ignores a sliced boundary tensor's storage offset
    (pytorch#182343): with ``searchsorted(cu[1:], ...)`` every token was numbered one sequence on
    under torch.compile on the GPU (GPT-2's positions went wrong; CPU inductor falls back to aten
    and is right, so only the graph can show it here). ``tests/test_gpu.py`` checks the numbers."""
    import operator

    from hf_varlen_patch.boundaries import Boundaries

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    lengths = [3, 5, 2]
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    torch._dynamo.reset()
    for check in (False, True):

        def numbering(cu, check=check):
            return Boundaries.from_cu_seqlens(cu, max(lengths), shape=(1, 10), check=check).seq_idx

        fn = torch.compile(numbering, backend=record, fullgraph=True)
        assert torch.equal(fn(cu).long(), torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2, 2]))
    searches = [n for gm in graphs for n in gm.graph.nodes if n.target in (torch.searchsorted, torch.bucketize)]
    assert len(searches) == 2, [str(n) for gm in graphs for n in gm.graph.nodes]
    for node in searches:
        boundaries = node.args[0] if node.target is torch.searchsorted else node.args[1]
        sliced = boundaries.op == "call_function" and boundaries.target in (operator.getitem, torch.narrow)
        assert not sliced, f"{node.format_node()} searches a slice: {boundaries.format_node()}"
