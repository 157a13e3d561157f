"""Host work of one training step, recurrent kernels stubbed: does packing add host work?

On a GPU the ~0.5B hybrids of ``bench_hybrid.py`` at 8 sequences per step are host-bound in every
row (host ms = step ms): the step's time is the host dispatching its ops, not the GPU running them.
This counts that work on CPU, where it can be isolated: a 24-layer Qwen3.5-style twin of tiny
width, its Gated DeltaNet kernels (fla's delta rule, the short convolution) replaced by cheap stubs of
the right shapes, upstream padded (attention_mask) vs packed + apply (the kernel path: rows
flattened, ``cu_seqlens``). It prints aten ops and host ms per forward + backward, and which ops
packing adds or removes.

    python scripts/host_ops.py
"""

from __future__ import annotations

import collections
import copy
import statistics
import time

import torch
import transformers

import hf_varlen_patch
from hf_varlen_patch.equivalence import build_twin
from hf_varlen_patch.recurrent import kernels
from hf_varlen_patch.testing import test_variants

LAYERS = 24
LENGTHS = [30, 7, 50, 12, 25, 40, 9, 20]


def delta_rule_stub(q, k, v, g=None, beta=None, initial_state=None, output_final_state=False, **_):
    return (v * beta[..., None]).contiguous(), None


def conv_stub_flat(x, weight, bias=None, activation=None, **_):  # fla's (1, N, dim) stream
    return x * weight[:, 0], None


def conv_stub_rows(x, weight, bias=None, activation=None, **_):  # upstream's (batch, dim, length)
    return x * weight[:, :1]


def timed(model, batch: dict, reps: int = 20) -> tuple[float, collections.Counter]:
    from torch.profiler import ProfilerActivity, profile

    times = []
    for _ in range(reps + 3):
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    ops = collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))
    return statistics.median(times[3:]) * 1e3, ops


def main() -> None:
    import transformers.models.qwen3_5.modeling_qwen3_5 as modeling

    torch.set_num_threads(1)
    config = copy.deepcopy(next(iter(test_variants("qwen3_5_text").values())))
    config.num_hidden_layers = LAYERS
    config.layer_types = (list(config.layer_types) * LAYERS)[:LAYERS]
    model = build_twin(config, model_class=transformers.AutoModelForCausalLM, seed=0).train()
    seqs = [torch.randint(1, config.vocab_size, (n,)) for n in LENGTHS]
    ids = torch.zeros(len(seqs), max(LENGTHS), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)], mask[r, : len(s)] = s, 1
    padded = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False)
    flat = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    packed = dict(input_ids=flat, position_ids=position_ids, labels=flat.clone(), use_cache=False)

    stubs = {"torch_chunk_gated_delta_rule": delta_rule_stub, "causal_conv1d_fn": conv_stub_rows}
    saved = {name: getattr(modeling, name) for name in stubs}
    try:
        for name, stub in stubs.items():
            setattr(modeling, name, stub)
        padded_ms, padded_ops = timed(model, padded)
    finally:
        for name, fn in saved.items():
            setattr(modeling, name, fn)
    flat_stubs = {"gated_delta_rule": delta_rule_stub, "fla_causal_conv1d": conv_stub_flat}
    real_kernel = kernels.kernel
    kernels.kernel = lambda name, *tensors: flat_stubs.get(name)
    try:
        hf_varlen_patch.apply(model)
        packed_ms, packed_ops = timed(model, packed)
        hf_varlen_patch.unapply(model)
    finally:
        kernels.kernel = real_kernel

    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}; {LAYERS} layers, {len(LENGTHS)} sequences"
    )
    print(f"upstream padded: {padded_ms:.1f} ms, {sum(padded_ops.values())} aten ops per forward + backward")
    print(f"packed + apply:  {packed_ms:.1f} ms, {sum(packed_ops.values())} aten ops per forward + backward")
    diff = collections.Counter(packed_ops)
    diff.subtract(padded_ops)
    print("packing adds:   ", ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in diff.most_common() if v > 0))
    print(
        "packing removes:",
        ", ".join(f"{k.removeprefix('aten::')} {-v}" for k, v in sorted(diff.items(), key=lambda kv: kv[1]) if v < 0),
    )


if __name__ == "__main__":
    main()
