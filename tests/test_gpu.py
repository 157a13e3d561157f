"""GPU equivalence in bf16 (marked ``gpu``; skipped where there is no CUDA device).

Tolerance, from bf16's own noise: ``noise`` is how far the separate (unpacked) bf16 runs are
from the same model in fp32. A packed run that is as good as the unpacked one is within
``noise`` of fp32 too, so by the triangle inequality packed and unpacked bf16 differ by at most
``2 * noise``. A boundary leak gives errors of order 1e-1, far outside. Errors are relative
norms (||a - b|| / ||b||; for gradients the worst parameter tensor), so single-ulp flips of one
element do not decide the verdict. Measured on an H100: logits mostly bit-identical, gradients
about one bf16 ulp apart.
"""

import copy
import re

import pytest
import torch
import transformers
from hf_varlen_patch.patches.hybrid import ATTENTION_FREE

import hf_varlen_patch
from hf_varlen_patch import BackendUnavailableError
from hf_varlen_patch.attention import BACKEND_USAGE
from hf_varlen_patch.recurrent import kernels
from hf_varlen_patch.testing import (
    make_packed_batch,
    max_grad_error,
    max_logits_error,
    registered_variants,
    relative_errors,
    run_packed,
    run_separate,
    test_variants,
    tiny_model,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]

LAYOUTS = [
    dict(rows=[[5, 9, 3, 11, 40], [64, 2, 17]], extra_padding=5, seed=11),
    dict(rows=[[1, 33, 7, 64, 64, 2]], seed=12),
]


def _eager_experts(model):
    """transformers' grouped_mm experts fault (CUDA: misaligned address) on the twins' tiny expert
    widths, and a CUDA fault poisons every later test; the experts' maths is unrelated to packing,
    so MoE twins run the eager expert loop on the GPU."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            config._experts_implementation = "eager"
    return model


def _widened(model_type, variant):
    """The twin with heads of at least 32 (flash kernels' smallest trained head dim, see
    CUTE_MIN_TRAIN_HEAD_DIM)."""
    return tiny_model(model_type, variant, min_head_dim=32)


def _bf16_check(model_type, variant, backend, grads=True, widen=False):
    model = _widened(model_type, variant) if widen else tiny_model(model_type, variant)
    fp32 = _eager_experts(model.to("cuda").train())
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    for layout in LAYOUTS:
        batch = make_packed_batch(vocab_size=fp32.config.vocab_size, **layout)
        truth = run_separate(fp32, batch, grads=grads)
        separate = run_separate(bf16, batch, grads=grads)
        hf_varlen_patch.apply(bf16, backend=backend)
        BACKEND_USAGE.clear()
        packed = run_packed(bf16, batch, use_cache=None, grads=grads)
        used = dict(BACKEND_USAGE)
        hf_varlen_patch.unapply(bf16)
        noise_logits, noise_grads = relative_errors(separate, truth)
        err_logits, err_grads = relative_errors(packed, separate)
        abs_logits, (abs_grads, worst) = max_logits_error(packed, separate), max_grad_error(packed, separate)
        print(
            f"{model_type}/{variant} {backend}->{used}: relative error logits {err_logits:.2e} "
            f"(bf16 noise {noise_logits:.2e}), grads {err_grads:.2e} (bf16 noise {noise_grads:.2e}); "
            f"max abs logits {abs_logits:.1e}, grads {abs_grads:.1e}"
        )
        assert err_logits <= 2 * noise_logits, (err_logits, noise_logits)
        assert err_grads <= 2 * noise_grads, (err_grads, noise_grads, worst)
    return used


@pytest.mark.parametrize("model_type, variant", registered_variants())
def test_bf16_torch_backend(model_type, variant):
    """The `torch` backend serves every layer it can, and refuses loudly what it lacks."""
    try:
        used = _bf16_check(model_type, variant, "torch")
    except BackendUnavailableError as err:
        missing = re.search(r"lacks \[(.*?)\]", str(err))
        assert missing and any(f in missing.group(1) for f in ("softcap", "alibi", "sinks", "value_head_dim")), err
        return
    assert set(used) == {"torch"} or (not used and model_type in ATTENTION_FREE)


@pytest.mark.parametrize("model_type", sorted({mt for mt, _ in registered_variants(multimodal=True)}))
def test_bf16_multimodal(model_type):
    """Vision-language twins in bf16 on the GPU: samples with images (and a video for the mRoPE
    models) packed in one row against the same samples alone, judged by bf16's own noise (the bf16
    samples alone against float32)."""
    from hf_varlen_patch.equivalence import _run_multimodal_packed, _run_samples
    from hf_varlen_patch.testing import multimodal_layouts, multimodal_samples

    fp32 = tiny_model(model_type, attn_implementation="sdpa").to("cuda").train()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    samples = multimodal_samples(fp32, multimodal_layouts(model_type), seed=1)
    truth = _run_samples(fp32, samples, grads=True)
    separate = _run_samples(bf16, samples, grads=True)
    from hf_varlen_patch.patches.multimodal import BLOCKS

    backend = "flex" if model_type in BLOCKS else "torch"  # bidirectional blocks: no varlen kernel takes them
    hf_varlen_patch.apply(bf16, backend=backend)
    BACKEND_USAGE.clear()
    packed = _run_multimodal_packed(bf16, samples, grads=True, layout="cu", use_cache=None)
    assert set(BACKEND_USAGE) == {backend}, dict(BACKEND_USAGE)
    noise_logits, noise_grads = relative_errors(separate, truth)
    err_logits, err_grads = relative_errors(packed, separate)
    print(
        f"{model_type} {backend}: relative error logits {err_logits:.2e} (bf16 noise {noise_logits:.2e}), "
        f"grads {err_grads:.2e} (bf16 noise {noise_grads:.2e})"
    )
    assert err_logits <= 2 * noise_logits, (err_logits, noise_logits)
    assert err_grads <= 2 * noise_grads, (err_grads, noise_grads)


@pytest.mark.parametrize("model_type, variant", registered_variants())
def test_bf16_auto_backend(model_type, variant):
    used = _bf16_check(model_type, variant, "auto")
    assert used or model_type in ATTENTION_FREE, "no packed attention call went through a backend"


#: recurrent types -> the fused kernels their packed forward should reach when installed, as groups
#: of alternatives (the first installed one of a group serves): delta rules, short convolutions
#: (causal-conv1d's CUDA build, else flash-linear-attention's Triton one), Mamba2's SSD scan
_CONV = ("causal_conv1d", "fla_causal_conv1d")
RECURRENT_KERNELS = {
    **{t: (("gated_delta_rule",), _CONV) for t in ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text", "olmo_hybrid")},
    "lara_mini": (("gated_delta_rule",), _CONV),
    **{t: (("kda",), _CONV) for t in ("kimi_linear", "bailing_hybrid")},
    **{t: (_CONV,) for t in ("lfm2", "lfm2_moe", "lfm3", "jamba", "mamba")},
    **{t: (("ssd_chunk_scan",), _CONV) for t in ("bamba", "falcon_h1", "nemotron_h")},
}


@pytest.mark.parametrize("grads", [True, False], ids=["train", "forward"])
@pytest.mark.parametrize("model_type", sorted(RECURRENT_KERNELS))
def test_bf16_recurrent_kernels(model_type, grads, monkeypatch):
    """With the kernels installed, packed recurrent layers run them (with their boundaries) and agree
    with the separate runs as closely as bf16 allows; forward only as well (scoring, RL log-probs)."""
    monkeypatch.setenv("HF_VARLEN_RECURRENT_KERNELS", "all")
    expected = [
        next((n for n in group if kernels._load(n) is not None), None) for group in RECURRENT_KERNELS[model_type]
    ]
    if not any(expected):
        pytest.skip(f"none of {RECURRENT_KERNELS[model_type]} is installed on this machine")
    if model_type not in dict(registered_variants()):
        pytest.skip(f"{model_type} is not registered on transformers {transformers.__version__}")
    kernels.KERNEL_USAGE.clear()
    _bf16_check(model_type, next(iter(test_variants(model_type))), "auto", grads=grads)
    print(f"{model_type}: kernel calls {dict(kernels.KERNEL_USAGE)}")
    for name in filter(None, expected):
        assert kernels.KERNEL_USAGE[name] > 0, (name, dict(kernels.KERNEL_USAGE))


@pytest.mark.parametrize("model_type", ["qwen3_next", "lfm2"])
def test_verified_kernels_serve_packed_calls_by_default(model_type, monkeypatch):
    """Without HF_VARLEN_RECURRENT_KERNELS, a verified kernel on its checked stack serves the packed
    recurrent layers (and keeps them exact within bf16's noise); anything else runs the torch ops."""
    monkeypatch.delenv("HF_VARLEN_RECURRENT_KERNELS", raising=False)
    kernels._verified_here.cache_clear()
    wanted = [n for group in RECURRENT_KERNELS[model_type] for n in group if n in kernels.VERIFIED]
    usable = [n for n in wanted if kernels._load(n) is not None and not kernels.VERIFIED[n].missing()]
    if not usable:
        pytest.skip(f"none of {wanted} is installed on its checked stack here ({kernels.VERIFIED})")
    kernels.KERNEL_USAGE.clear()
    _bf16_check(model_type, next(iter(test_variants(model_type))), "auto")
    assert all(kernels.KERNEL_USAGE[n] > 0 for n in usable), dict(kernels.KERNEL_USAGE)
    assert set(kernels.KERNEL_USAGE) <= set(kernels.VERIFIED), dict(kernels.KERNEL_USAGE)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "gemma2"])
def test_bf16_flex_backend(model_type):
    variant = next(iter(test_variants(model_type)))
    _bf16_check(model_type, variant, "flex")


def test_no_device_sync_inside_layers_with_collator_kwargs():
    """cu_seq_lens from a collator, check_inputs=False: the packed forward never syncs."""
    model = hf_varlen_patch.apply(
        tiny_model("llama", device="cuda", dtype=torch.bfloat16), "torch", check_inputs=False
    ).eval()
    batch = make_packed_batch([[5, 9, 3, 40]], model.config.vocab_size)
    cu = torch.tensor([0, 5, 14, 17, 57], dtype=torch.int32, device="cuda")
    ids = batch.input_ids.cuda()
    with torch.no_grad():
        model(input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=40, max_length_k=40, use_cache=False)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=40, max_length_k=40, use_cache=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def _flash_or_skip():
    from hf_varlen_patch.backends import flash

    if flash._flash() is None:
        pytest.skip("flash-attn is not installed on this machine")
    return flash._flash()[2]


@pytest.mark.parametrize("model_type, variant", registered_variants())
def test_bf16_flash_attn_backend(model_type, variant):
    """The real flash-attn kernel (FA4, FA3 or FA2, whichever is installed) serves every layer
    whose features it has, packed == separate within bf16's noise, forward and gradients; what it
    lacks is refused by name."""
    _flash_or_skip()
    try:
        used = _bf16_check(model_type, variant, "flash_attn", widen=True)
    except BackendUnavailableError as err:
        if "backward is wrong for" in str(err):  # a twin whose heads could not be widened
            return
        missing = re.search(r"lacks \[(.*?)\]", str(err))
        assert missing and any(f in missing.group(1) for f in ("alibi", "dropout", "value_head_dim", "sinks")), err
        return
    assert set(used) == {"flash_attn"} or (not used and model_type in ATTENTION_FREE)


def test_flash_attn_refuses_to_train_heads_fa4_gets_wrong():
    """FA4 4.0.0b36's backward is wrong for 16-dim heads (scripts/fa4_grad_probe.py): training
    there is refused by name, and auto runs those layers on another backend, correctly."""
    if _flash_or_skip() != "flash_attn.cute":
        pytest.skip("the installed flash-attn is not FA4")
    with pytest.raises(BackendUnavailableError, match="backward is wrong for 16-dim heads"):
        _bf16_check("llama", "default", "flash_attn")
    # auto: the training forwards run on the exact reference (gradients checked against bf16's
    # noise), the no-grad loss forwards (inference) still on FA4
    used = _bf16_check("llama", "default", "auto")
    assert used.get("sdpa", 0) > 0 and set(used) <= {"sdpa", "flash_attn"}, used


COMPILE_LAYOUTS = [[1, 33, 7, 64, 64, 2], [5, 9, 3, 11, 40, 64, 2, 17]]


def _compiled_run(compiled, model, lengths, vocab, seed):
    """One packed training step through ``compiled`` with the collator's kwargs, as a Run."""
    from hf_varlen_patch.equivalence import Run, _grads, _token_loss_sum

    batch = make_packed_batch([lengths], vocab, seed=seed).to("cuda")
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    model.zero_grad(set_to_none=True)
    out = compiled(input_ids=batch.input_ids, use_cache=False, **kwargs)
    pieces = [out.logits[r, s : s + n] for r, s, n in batch.spans]
    loss = sum(_token_loss_sum(p, q) for p, q in zip(pieces, batch.sequences)) / sum(n - 1 for n in lengths)
    loss.backward()
    return Run([p.detach().float() for p in pieces], float(loss.detach()), None, _grads(model)), batch


@pytest.mark.parametrize(
    "model_type, backend",
    [("llama", "torch"), ("mistral", "torch"), ("gpt2", "torch"), ("llama", "flash_attn"), ("gemma2", "flash_attn")],
)
def test_compiled_packed_step_is_one_graph_on_the_gpu(model_type, backend):
    """inductor, bf16, the real kernel: no graph break, at most two recompiles over 20 batches of
    new lengths, and the compiled packed step equals the separate bf16 runs within bf16's noise."""
    from torch._dynamo.testing import CompileCounterWithBackend

    if backend == "flash_attn":
        _flash_or_skip()
    torch._dynamo.reset()
    fp32 = _eager_experts(_widened(model_type, next(iter(test_variants(model_type)))).to("cuda").train())
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    vocab = fp32.config.vocab_size
    truths = [
        (
            run_separate(fp32, make_packed_batch([r], vocab, seed=i)),
            run_separate(bf16, make_packed_batch([r], vocab, seed=i)),
        )
        for i, r in enumerate(COMPILE_LAYOUTS)
    ]
    hf_varlen_patch.apply(bf16, backend=backend, check_inputs=False)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(bf16, backend=counter)
    batch = make_packed_batch([COMPILE_LAYOUTS[0]], vocab).to("cuda")
    cu = torch.tensor([0, *torch.tensor(COMPILE_LAYOUTS[0]).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    explained = torch._dynamo.explain(bf16)(
        input_ids=batch.input_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=64, max_length_k=64, use_cache=False
    )
    assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
    gen = torch.Generator().manual_seed(0)
    for i in range(20):
        lengths = torch.randint(1, 80, (int(torch.randint(2, 7, (1,), generator=gen)),), generator=gen).tolist()
        _compiled_run(compiled, bf16, lengths, vocab, 100 + i)
    assert counter.frame_count <= 3, counter.frame_count
    for (truth, separate), lengths in zip(truths, COMPILE_LAYOUTS):
        packed, _ = _compiled_run(compiled, bf16, lengths, vocab, COMPILE_LAYOUTS.index(lengths))
        noise, err = relative_errors(separate, truth), relative_errors(packed, separate)
        print(
            f"{model_type} {backend} compiled: logits {err[0]:.2e} (noise {noise[0]:.2e}), "
            f"grads {err[1]:.2e} (noise {noise[1]:.2e})"
        )
        assert err[0] <= 2 * noise[0] and err[1] <= 2 * noise[1], (err, noise)
    hf_varlen_patch.unapply(bf16)


@pytest.mark.parametrize("check", [False, True])
@pytest.mark.parametrize("sliced", [False, True])
def test_compiled_boundaries_number_tokens_as_eager_on_the_gpu(check, sliced):
    """Inductor's Triton searchsorted once read a sliced boundary tensor from its storage's start
    (pytorch#182343): every token was numbered one sequence on, so absolute positions (GPT-2) went
    negative under torch.compile on the GPU while CPU inductor (an aten fallback) stayed right.
    The compiled boundaries must give the eager sequence ids and positions, also for offsets
    that are themselves a view with a storage offset."""
    from hf_varlen_patch.boundaries import Boundaries

    lengths = [5, 9, 3, 11, 40, 64, 2, 17]
    total = sum(lengths)
    offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    storage = torch.tensor([99, 98, *offsets], dtype=torch.int32, device="cuda")
    cu = storage[2:] if sliced else storage[2:].clone()
    assert cu.storage_offset() == (2 if sliced else 0)

    def numbering(cu):
        b = Boundaries.from_cu_seqlens(cu, max(lengths), shape=(1, total), check=check)
        return b.seq_idx, b.position_ids(), b.start_mask()

    expected_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    expected_pos = torch.cat([torch.arange(n) for n in lengths])[None]
    torch._dynamo.reset()
    for run in (numbering, torch.compile(numbering, backend="inductor", fullgraph=True)):
        seq_idx, positions, starts = run(cu)
        assert torch.equal(seq_idx.cpu().long(), expected_idx), seq_idx
        assert torch.equal(positions.cpu(), expected_pos), positions
        assert torch.equal(starts.cpu(), expected_pos == 0)
