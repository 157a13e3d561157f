"""torch.compile on patched models: graph breaks (torch._dynamo.explain) and recompiles.

For each registered model_type's tiny twin, patched with ``--backend``: the graph breaks of one
packed forward (and their reasons), then the number of compilations over ``--batches`` packed
training steps of new lengths, and whether the compiled step's loss and gradients equal the eager
step's. ``--layout cu`` feeds the collator's ``cu_seq_lens_q/k`` + ``max_length_q/k``
(``PackingCollator(return_flash_attn_kwargs=True)``, ``DataCollatorWithFlattening``);
``--layout pos`` only ``position_ids``, which the entry reads on the host (one graph break).

    python scripts/compile_check.py                                  # every type, CPU, sdpa, cu
    python scripts/compile_check.py --types llama,gpt2 --layout pos
    python scripts/compile_check.py --device cuda --dtype bfloat16 --backend flash_attn --compiler inductor
    python scripts/compile_check.py --types bamba,lfm2 --blocks        # each decoder block compiled alone

``--blocks`` compiles every decoder block (``_no_split_modules``) on its own, the model's entry
eager (per-block compilation), and runs one packed step with ``position_ids``: the graph breaks
inside the blocks, the compilations (per kind of block and grad mode when blocks share graphs), and
the packed step's error against each sequence run alone.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import traceback
import warnings

import torch

import hf_varlen_patch
from hf_varlen_patch.testing import registered_variants, tiny_model


def packed_inputs(lengths: list[int], vocab: int, layout: str, device: str, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    ids = torch.randint(1, vocab, (1, total), generator=gen).to(device)
    batch = dict(input_ids=ids, labels=ids.clone(), use_cache=False)
    if layout == "pos":
        batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    else:
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths))
    return batch


def step(model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def check(model_type: str, variant: str, args) -> dict:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    dtype = getattr(torch, args.dtype)
    widen = args.min_head_dim if args.min_head_dim is not None else (32 if args.backend == "flash_attn" else 0)
    model = tiny_model(model_type, variant, device=args.device, dtype=dtype, min_head_dim=widen or None).train()
    hf_varlen_patch.apply(model, backend=args.backend, check_inputs=args.check_inputs)
    # below float32, the yardstick for compiled vs eager is eager's own rounding: eager vs a float32 copy
    # (with backend "auto": a varlen kernel such as torch's takes no float32)
    reference = copy.deepcopy(model).float() if dtype != torch.float32 else None
    if reference is not None:
        hf_varlen_patch.unapply(reference)
        hf_varlen_patch.apply(reference, backend="auto", check_inputs=args.check_inputs)
    vocab = model.config.get_text_config().vocab_size
    rng = random.Random(args.seed)
    batches = [
        packed_inputs([rng.randint(2, 24) for _ in range(rng.randint(2, 5))], vocab, args.layout, args.device, i)
        for i in range(args.batches)
    ]
    explained = torch._dynamo.explain(model)(**batches[0])
    reasons = sorted({str(r.reason).splitlines()[0][:160] for r in explained.break_reasons})
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(args.compiler)
    compiled = torch.compile(model, backend=counter)
    worst = worst_rel = noise_rel = 0.0
    for batch in batches:
        loss_c, grads_c = step(compiled, batch)
        if len(grads_c) == 0:
            raise RuntimeError("no gradients")
    for batch in batches[-2:]:
        loss_c, grads_c = step(compiled, batch)
        loss_e, grads_e = step(model, batch)
        pairs = [(loss_c, loss_e), *zip(grads_c, grads_e)]
        worst = max([worst] + [float((a - b).abs().max()) for a, b in pairs])
        worst_rel = max([worst_rel] + [_relative(a, b) for a, b in pairs])
        if reference is not None:
            loss_r, grads_r = step(reference, batch)
            noise_rel = max([noise_rel] + [_relative(a, b) for a, b in zip([loss_e, *grads_e], [loss_r, *grads_r])])
    hf_varlen_patch.unapply(model)
    return dict(
        graphs=explained.graph_count,
        breaks=explained.graph_break_count,
        reasons=reasons,
        compiles=counter.frame_count,
        compiled_vs_eager=worst,
        compiled_vs_eager_rel=worst_rel,
        eager_vs_float32_rel=noise_rel if reference is not None else None,
    )


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float32 (a max abs mixes gradients of every scale: bf16 twins' embeddings reach 1e1)."""
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def check_blocks(model_type: str, variant: str, args) -> dict:
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    from hf_varlen_patch.testing import make_packed_batch, max_grad_error, max_logits_error, run_packed, run_separate

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model(model_type, variant, device=args.device, dtype=getattr(torch, args.dtype)).train()
    batch = make_packed_batch([[5, 9, 3, 11]], model.config.get_text_config().vocab_size, seed=args.seed)
    truth = run_separate(model, batch)
    hf_varlen_patch.apply(model, backend=args.backend)
    counter = CompileCounterWithBackend(args.compiler)
    blocks = [m for m in model.modules() if type(m).__name__ in set(model._no_split_modules or ())]
    for block in blocks:
        block.compile(backend=counter)
    packed = run_packed(model, batch)  # a forward with gradients, one without (the model's loss)
    hf_varlen_patch.unapply(model)
    reasons = sorted({str(k).splitlines()[0][:160] for k in counters["graph_break"]})
    return dict(
        blocks=len(blocks),
        breaks=sum(counters["graph_break"].values()),
        reasons=reasons,
        compiles=counter.frame_count,
        logits=max_logits_error(packed, truth),
        grads=max_grad_error(packed, truth)[0],
    )


def run_table(types: list[str], variants: dict, args, check_fn, header: str, cells) -> int:
    """One markdown row per type (``cells(result)``: its columns before the break reasons), errors
    reported as rows; returns how many types failed."""
    failures = 0
    print(header)
    print("| --- " * (header.count("|") - 1) + "|")
    for model_type in types:
        try:
            r = check_fn(model_type, variants.get(model_type, "default"), args)
        except Exception as err:  # a failure is a result to report
            failures += 1
            blanks, why = "| " * (header.count("|") - 4), f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            print(f"| {model_type} | ERROR {blanks}| {why} |", flush=True)
            traceback.print_exc()  # to stderr: the frame that failed, for the log
            continue
        print(f"| {model_type} | {' | '.join(cells(r))} | {'; '.join(r['reasons'])} |", flush=True)
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default="", help="comma-separated model_types (default: every registered one)")
    parser.add_argument("--layout", choices=("cu", "pos"), default="cu")
    parser.add_argument("--backend", default="sdpa")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compiler", default="aot_eager", help="torch.compile backend for the recompile count")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--check-inputs", action="store_true", help="validate cu_seq_lens (a host sync per step)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--min-head-dim", type=int, default=None, help="widen the twins' heads (default 32 for flash_attn: FA4's floor)"
    )
    parser.add_argument("--blocks", action="store_true", help="compile each decoder block alone (see above)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    variants = dict(registered_variants())
    types = args.types.split(",") if args.types else sorted(variants)
    if args.blocks:
        print(f"blocks compiled alone: backend={args.backend} device={args.device} compiler={args.compiler}")
        failures = run_table(
            types, variants, args, check_blocks,
            "| model_type | blocks | breaks | compiles | packed vs separate: logits | grads | break reasons |",
            lambda r: [*(str(r[k]) for k in ("blocks", "breaks", "compiles")), f"{r['logits']:.1e}",
                       f"{r['grads']:.1e}"],
        )  # fmt: skip
    else:
        print(f"layout={args.layout} backend={args.backend} device={args.device} compiler={args.compiler}")
        failures = run_table(
            types, variants, args, check,
            "| model_type | graphs | breaks | compiles over batches | compiled vs eager: max abs "
            "| relative (worst tensor) | eager vs float32 copy: relative (the rounding yardstick) | break reasons |",
            lambda r: [str(r["graphs"]), str(r["breaks"]), str(r["compiles"]), f"{r['compiled_vs_eager']:.1e}",
                       f"{r['compiled_vs_eager_rel']:.1e}",
                       "-" if r["eager_vs_float32_rel"] is None else f"{r['eager_vs_float32_rel']:.1e}"],
        )  # fmt: skip
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
