"""Sequence parallel vs one process, on CPU over gloo: run with torchrun.

Every rank builds the same tiny model and the same packed batch (sequences of uneven lengths
whose total the degree does not divide). The reference is one process running the whole packed
batch after ``apply(model)``. The sharded run is ``apply(model, sequence_parallel=True)`` on
``shard_packed_batch(batch)``: its logits gathered from all ranks, its loss summed over ranks and
its gradients summed over ranks (``all_reduce``) must equal the reference (float32). The naive
split (each rank runs its slice with its own positions and no exchange) is measured too, to show
the comparison sees what sequence parallel fixes.

With ``--images`` the batch is a vision-language one: the tiny twin's standard samples (text,
images, a video where the type mixes them; ``hf_varlen_patch.testing.multimodal_samples``) packed
by ``pack_multimodal``, the vision inputs handed whole to every rank. The gradients compared then
include the vision tower's ("vision_grads": its largest error); "split_images" counts the images
whose placeholder tokens straddle two ranks. The naive split runs the slice's tokens alone (its
placeholders as plain tokens: a slice cannot pair a part of an image's placeholders with it).

    torchrun --nproc_per_node 2 scripts/sequence_parallel_equivalence.py llama mistral --backend sdpa
    torchrun --nproc_per_node 3 scripts/sequence_parallel_equivalence.py qwen2_5_vl qwen2_vl --images
    torchrun --nproc_per_node 1 scripts/sequence_parallel_equivalence.py llama --device cuda --dtype bfloat16
    torchrun --nproc_per_node 2 scripts/sequence_parallel_equivalence.py --all    # the registry, ~5 min on 2 cores
Rank 0 prints one JSON line per type: {"model_type", "degree", "logits", "loss", "grads", "naive"}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist


def packed_batch(vocab: int, lengths: list[int], seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(1, vocab, (n,), generator=gen) for n in lengths])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    labels[0, starts] = -100
    return {"input_ids": ids, "position_ids": positions, "labels": labels}


def image_batch(model, device: str, dtype: torch.dtype) -> dict:
    """The twin's standard vision-language samples, packed (pack_multimodal), on ``device``."""
    from hf_varlen_patch.packing import pack_multimodal
    from hf_varlen_patch.testing import multimodal_layouts, multimodal_samples

    samples = multimodal_samples(model, multimodal_layouts(model.config.model_type), seed=1)
    batch = pack_multimodal(samples)
    return {
        k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def split_images(model, ids: torch.Tensor, share: int) -> tuple[int, int]:
    """(images and videos in the row, how many of them have placeholder tokens on two ranks)."""
    config = model.config
    marks = [getattr(config, name, None) for name in ("image_token_id", "video_token_id")]
    flat = ids.reshape(-1).tolist()
    runs, start = [], None
    for i, token in enumerate([*flat, None]):
        inside = token is not None and token in marks
        if inside and start is None:
            start = i
        elif not inside and start is not None:
            runs.append((start, i))
            start = None
    return len(runs), sum(1 for a, b in runs if a // share != (b - 1) // share)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def max_error(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def check(
    model_type: str,
    backend: str,
    lengths: list[int],
    device: str = "cpu",
    dtype: str = "float32",
    checkpointing: bool = False,
    attention: str = "auto",
    images: bool = False,
    layout: str = "contiguous",
    lora: bool = False,
) -> dict:
    import hf_varlen_patch
    from hf_varlen_patch.testing import tiny_model as tiny

    def tiny_model(name):
        model = tiny(name).to(device=device, dtype=getattr(torch, dtype))
        if not lora:
            return model
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)  # the same adapters in every run; non-zero B, so they have gradients
        config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        return get_peft_model(model, config)

    rank, world = dist.get_rank(), dist.get_world_size()
    reference = tiny_model(model_type)
    extra = {}
    if images:  # the samples' placeholders are counted with the unpatched model's own feature functions
        batch = image_batch(reference, device, getattr(torch, dtype))
        extra = {"use_cache": False}
    else:
        vocab = reference.config.get_text_config().vocab_size
        batch = {k: v.to(device) for k, v in packed_batch(vocab, lengths).items()}
    reference = hf_varlen_patch.apply(reference, backend=backend)
    total = batch["input_ids"].shape[1]
    out = reference(**batch, **extra)
    out.loss.backward()
    expected_logits, expected_loss, expected_grads = out.logits.detach(), float(out.loss), grads(reference)

    parallel = hf_varlen_patch.SequenceParallel(attention=attention)
    model = hf_varlen_patch.apply(tiny_model(model_type), backend=backend, sequence_parallel=parallel)
    if checkpointing:  # every layer recomputed in the backward, collectives included
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    shard = hf_varlen_patch.shard_packed_batch(batch, layout=layout)
    out = model(**shard, **extra)
    out.loss.backward()
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    gathered = [torch.empty_like(out.logits) for _ in range(world)]
    dist.all_gather(gathered, out.logits.detach().contiguous())
    from hf_varlen_patch.sequence_parallel import slice_pieces

    padded = shard["input_ids"].shape[1] * world  # the ranks' tokens, in stream order
    order = torch.cat([torch.arange(a, b) for r in range(world) for a, b in slice_pieces(layout, r, world, padded)])
    logits = torch.empty_like(torch.cat(gathered, dim=1))
    logits[:, order.to(logits.device)] = torch.cat(gathered, dim=1)
    logits = logits[:, :total]
    # every parameter, in one order on every rank (a MoE expert no token of a slice chose has no gradient there)
    sharded_grads = {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
        if n in expected_grads
    }
    for g in sharded_grads.values():
        dist.all_reduce(g)

    # in eval mode every rank reports the whole stream's loss (what Trainer's evaluation averages)
    model.eval()
    with torch.no_grad():
        eval_error = torch.tensor(abs(float(model(**shard, **extra).loss) - expected_loss), device=device)
    dist.all_reduce(eval_error, op=dist.ReduceOp.MAX)

    # the naive split: this rank's slice with its own positions, nothing exchanged
    naive = hf_varlen_patch.apply(tiny_model(model_type), backend=backend)
    share = shard["input_ids"].shape[1]
    piece = slice(rank * share, min((rank + 1) * share, total))
    try:
        with torch.no_grad():
            naive_logits = naive(
                input_ids=batch["input_ids"][:, piece], position_ids=batch["position_ids"][:, piece], **extra
            ).logits
        naive_error = torch.tensor(float((naive_logits - expected_logits[:, piece]).abs().max()), device=device)
    except Exception:  # a slice that starts inside a sequence may not even run alone (positions past its table)
        naive_error = torch.tensor(float("inf"), device=device)
    dist.all_reduce(naive_error, op=dist.ReduceOp.MAX)
    vision = {}
    if images:
        count, split = split_images(reference, batch["input_ids"], share)
        vision = {"images": count, "split_images": split}
        if count:  # the vision tower's own parameters (a text-only batch leaves them without gradients)
            tower = {n: g for n, g in sharded_grads.items() if n.startswith(("model.visual.", "visual."))}
            assert tower, "the vision tower got no gradient"
            vision["vision_grads"] = max_error(tower, {n: expected_grads[n] for n in tower})
    return {
        "model_type": model_type,
        "degree": world,
        "attention": attention,
        "layout": layout,
        "tokens": total,
        "logits": float((logits - expected_logits).abs().max()),
        "loss": abs(float(loss) - expected_loss),
        "eval_loss": float(eval_error),
        "grads": max_error(sharded_grads, expected_grads),
        "naive": float(naive_error),
        **vision,
    }


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser()
    parser.add_argument("model_types", nargs="*", help="model types (default with --all: every registered one)")
    parser.add_argument("--all", action="store_true", help="every registered text model type, and a summary")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--lengths", default="7,13,4,22,9", help="sequence lengths of the packed row")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per rank)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in the sharded run")
    parser.add_argument("--attention", default="auto", choices=("auto", "ulysses", "all_gather_kv"))
    parser.add_argument("--lora", action="store_true", help="both models wrapped in PEFT LoRA adapters")
    parser.add_argument("--layout", default="contiguous", choices=("contiguous", "zigzag"), help="the ranks' slices")
    parser.add_argument("--images", action="store_true", help="vision-language batches with images (tiny VLMs)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    lengths = [int(n) for n in args.lengths.split(",")]
    types = args.model_types
    if args.all:
        from hf_varlen_patch.testing import registered_variants

        types = sorted({model_type for model_type, _ in registered_variants()})
    from hf_varlen_patch.errors import VarlenPatchError

    counts = {"exact": 0, "refused": 0, "differs": 0, "crashed": 0}
    for model_type in types:
        try:
            options = (args.device, args.dtype, args.checkpointing, args.attention, args.images, args.layout, args.lora)
            result = check(model_type, args.backend, lengths, *options)
        except Exception as err:  # reported per type: a typed refusal, or a crash (a bug)
            result = {"model_type": model_type, "degree": dist.get_world_size(), "error": type(err).__name__,
                      "message": str(err)[:300], "typed": isinstance(err, VarlenPatchError)}  # fmt: skip
        if "error" in result:
            counts["refused" if result["typed"] else "crashed"] += 1
        else:
            counts["exact" if max(result["logits"], result["loss"], result["grads"]) <= 1e-5 else "differs"] += 1
        if dist.get_rank() == 0:
            print(json.dumps(result), flush=True)
    if args.all and dist.get_rank() == 0:
        print(f"# {len(types)} types at degree {dist.get_world_size()}: {counts}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    # every result is printed: leave without the interpreter's teardown, where a gloo rank once
    # aborted ("terminate called without an active exception", a joinable C++ thread at exit)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
