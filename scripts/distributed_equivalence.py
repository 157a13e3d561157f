"""Packed + apply under distributed training == one process training padded on the global batch.

Run with torchrun (or ``python -m torch.distributed.run``), one process per rank:

    torchrun --nproc_per_node 2 scripts/distributed_equivalence.py --engine ddp   # CPU, gloo
    accelerate launch --multi_gpu --num_processes 2 scripts/distributed_equivalence.py --engine accelerate --device cuda
    torchrun --nproc_per_node 2 scripts/distributed_equivalence.py --engine deepspeed3  # ZeRO-3 via accelerate
    torchrun --nproc_per_node 2 scripts/distributed_equivalence.py --engine fsdp2 --device cuda \\
        --dtype bfloat16 --model-type llama --size 1b                                # 2 GPUs, nccl

Every step, each rank takes its own sequences (different counts and lengths per rank, so its
packed row has its own token count), packs them into one row and trains through DDP, FSDP2
(``fully_shard`` per decoder layer and at the root), accelerate's ``Accelerator.prepare`` (DDP),
or DeepSpeed ZeRO-2/3 through accelerate's ``DeepSpeedPlugin`` (``--engine deepspeed2|deepspeed3``;
fp32 on the CPU, bf16 with fp32 master weights on GPUs). The loss is normalised over the *global*
number of targets, as Trainer does with ``num_items_in_batch``: each rank passes it to the
model's loss and scales by the world size, which the gradient averaging divides out. Rank 0 then
trains a copy of the initial model in one process, padded, on the same global batch, and
compares every parameter. It also counts the collectives each rank's packed steps issued (from
the profiler), with and without the patch (``--no-apply`` runs the same check unpatched). Writes JSON to
``--out`` (rank 0).

``--sequence-parallel``: the ranks split one stream instead of each running its own row.
``SequenceParallelCollator`` gathers every rank's sequences, packs them into one stream and hands
each rank its slice; the model is ``apply(model, sequence_parallel=True)``. The engine's gradient
average then sums the ranks' shares. ``--engine trainer`` trains through HF ``Trainer`` (DDP) with
that collator and its own ``num_items_in_batch``; the reference is the same padded process.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import random
import sys
import threading
from collections import Counter

import torch
import torch.distributed as dist

import hf_varlen_patch


def collective_counts(prof) -> dict[str, int]:
    """Collectives the profiler saw, by name (``c10d::`` ops and the process group's own events:
    DDP's bucketed all-reduce from C++ and FSDP2's all-gathers/reduce-scatters alike)."""
    counts: Counter[str] = Counter()
    for event in prof.events():
        if event.name.startswith(("c10d::", "gloo:", "nccl:")):
            counts[event.name] += 1
    return dict(counts)


def build_model(args):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from hf_varlen_patch.testing import tiny_model

    if args.size == "tiny":
        return tiny_model(args.model_type)
    assert args.model_type == "llama", "--size 1b builds a Llama-style model"
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)  # fmt: skip
    return AutoModelForCausalLM.from_config(cfg)


def global_batches(args, vocab: int, world: int) -> list[list[list[torch.Tensor]]]:
    """batches[step][rank] = that rank's sequences (a rank-dependent count and lengths)."""
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    out = []
    for _ in range(args.steps):
        step = []
        for rank in range(world):
            count = rng.randint(1, args.max_sequences) + rank  # ranks differ in count and tokens
            if args.equal_counts:  # (Trainer's loader gives every rank one batch size)
                count = args.max_sequences
            step.append([torch.randint(1, vocab, (rng.randint(2, args.max_len),), generator=gen) for _ in range(count)])
        out.append(step)
    return out


def packed_inputs(seqs: list[torch.Tensor], device) -> dict:
    ids = torch.cat(seqs)[None]
    pos = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    return dict(input_ids=ids.to(device), position_ids=pos.to(device), labels=ids.clone().to(device))


def padded_inputs(seqs: list[torch.Tensor], device) -> dict:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = s
        mask[r, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))


def targets(seqs: list[torch.Tensor]) -> int:
    return sum(len(s) - 1 for s in seqs)


def deepspeed_config(stage: int, dtype: torch.dtype) -> dict:
    """ZeRO-``stage`` with the script's own SGD (a client optimizer), no clipping, one micro-batch
    (a packed row) per rank and step; bf16 keeps DeepSpeed's fp32 master weights."""
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    return config


def train_with_trainer(model, batches, args, rank, world) -> torch.nn.Module:
    """HF Trainer (DDP over the ranks, SGD, no clipping) on the steps' sequences in order, each rank
    given its own sequences by Trainer's own data loader, through ``SequenceParallelCollator``."""
    import tempfile

    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    examples = [{"input_ids": s.tolist()} for step in batches for rank_seqs in step for s in rank_seqs]
    counts = {len(rank_seqs) for step in batches for rank_seqs in step}
    assert len(counts) == 1, "Trainer gives every rank the same number of examples per step"

    class InOrder(Trainer):  # examples in dataset order: step k, rank r takes batch k * world + r
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    training_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=counts.pop(), max_steps=len(batches),
        learning_rate=args.lr, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        use_cpu=args.device == "cpu", report_to=[], save_strategy="no", logging_strategy="no",
        dataloader_num_workers=0, seed=args.seed, average_tokens_across_devices=True,
    )  # fmt: skip
    trainer = InOrder(
        model=model, args=training_args, train_dataset=examples,
        data_collator=hf_varlen_patch.SequenceParallelCollator(),
    )  # fmt: skip
    trainer.train()
    return trainer.model


def wrap(model, args, device):
    """(the wrapped model, its optimizer, how to run backward) for ``args.engine``."""
    if args.engine.startswith("deepspeed"):  # ZeRO through accelerate's DeepSpeedPlugin
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(int(args.engine[-1]), getattr(torch, args.dtype)))
        accelerator = Accelerator(deepspeed_plugin=plugin)
        engine, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=args.lr))
        # accelerator.backward runs DeepSpeed's backward and its optimizer step; opt.step() is a no-op
        return engine, opt, accelerator.backward
    if args.engine == "accelerate":  # Accelerator.prepare (DDP under `accelerate launch`)
        from accelerate import Accelerator

        wrapped = Accelerator(cpu=device.type == "cpu").prepare(model)
    elif args.engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        from torch.distributed.fsdp import fully_shard

        blocks = set(getattr(model, "_no_split_modules", None) or ())  # transformers' decoder-layer classes
        for module in list(model.modules()):
            if type(module).__name__ in blocks:
                fully_shard(module)
        fully_shard(model)
        wrapped = model
    return wrapped, torch.optim.SGD(wrapped.parameters(), lr=args.lr), lambda loss: loss.backward()


def full_parameters(model) -> dict[str, torch.Tensor]:
    """Every parameter whole, on the host: FSDP2's DTensors gathered, ZeRO-3's partitions too."""
    import contextlib

    params = list(model.named_parameters())
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for _, p in params):  # ZeRO-3 partitions (every rank takes part)
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
    out = {}
    with gather:
        for name, p in params:
            value = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name.removeprefix("module.")] = value.detach().float().cpu().clone()
    return out


def train_padded(model, batches, args, device) -> dict[str, torch.Tensor]:
    """One process, padded, on every rank's sequences of each step together."""
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    for step in batches:
        seqs = [s for rank_seqs in step for s in rank_seqs]
        loss = model(**padded_inputs(seqs, device), use_cache=False).loss  # the mean over all targets
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return full_parameters(model)


def update_difference(a: dict, b: dict, initial: dict) -> float:
    """||a - b|| / ||b - initial|| over all parameters: a difference relative to how far training
    moved them (so low-precision rounding is judged against the size of the update)."""
    diff = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in b)
    moved = sum(float((b[k] - initial[k]).double().pow(2).sum()) for k in b)
    return (diff / max(moved, 1e-30)) ** 0.5


def run_bench(wrapped, opt, backward, args, device, vocab, rank, world) -> dict:
    """Median step time, real tokens/s and peak memory per rank: packed rows vs padded batches of
    the same FLAN-like sequences (8 per rank per step) through the same wrapped model (padded
    batches are not packed, so they run upstream's code)."""
    import statistics
    import sys
    import time
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_llama import lengths_for

    out = {}
    for mode in ("padded", "packed"):
        times, tokens = [], []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(args.bench + 2):
            lengths = lengths_for("flan", i * world + rank, 8, args.seed, 2048)
            seqs = [torch.randint(1, vocab, (n,)) for n in lengths]
            batch = packed_inputs(seqs, device) if mode == "packed" else padded_inputs(seqs, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = wrapped(**batch, use_cache=False).loss
            backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 2:  # two warm-up steps
                times.append(time.perf_counter() - start)
                tokens.append(sum(lengths))
        median = statistics.median(times)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        out[mode] = dict(median_ms=median * 1e3, tokens_per_s=statistics.mean(tokens) / median, peak_gb=peak)
    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    return {f"rank{r}": g for r, g in enumerate(gathered)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--engine", choices=("ddp", "fsdp2", "accelerate", "deepspeed2", "deepspeed3", "trainer"), default="ddp"
    )
    parser.add_argument("--model-type", default="llama")
    parser.add_argument("--size", choices=("tiny", "1b"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--max-sequences", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-apply", action="store_true", help="the same check, unpatched")
    parser.add_argument("--sequence-parallel", action="store_true", help="the ranks split one stream (see above)")
    parser.add_argument("--equal-counts", action="store_true", help="every rank the same number of sequences")
    parser.add_argument("--out", default="")
    parser.add_argument("--trace", default="", help="write rank 0's profiler trace (Chrome JSON) here")
    parser.add_argument("--bench", type=int, default=0, help="then time this many FLAN-like steps, packed vs padded")
    args = parser.parse_args()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # a collective that waits longer than this fails instead of hanging the run
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=180))
    dtype = getattr(torch, args.dtype)

    model = build_model(args).to(device=device, dtype=dtype).train()
    reference = copy.deepcopy(model) if rank == 0 else None
    # in low precision, rank 0 also trains in float32: how far rounding alone moves the parameters
    reference32 = copy.deepcopy(model).float() if rank == 0 and dtype != torch.float32 else None
    initial = full_parameters(model) if rank == 0 else None
    vocab = model.config.get_text_config().vocab_size
    batches = global_batches(args, vocab, world)
    if not args.no_apply:
        hf_varlen_patch.apply(model, check_inputs=False, sequence_parallel=True if args.sequence_parallel else None)
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        if args.engine == "trainer":
            wrapped = opt = None
            trained_model = train_with_trainer(model, batches, args, rank, world)
        else:
            wrapped, opt, backward = wrap(model, args, device)
            trained_model = wrapped
            collate = hf_varlen_patch.SequenceParallelCollator() if args.sequence_parallel else None
            for step in batches:
                n_global = sum(targets(seqs) for seqs in step)
                if collate is not None:  # this rank's slice of one stream of every rank's sequences
                    batch = {k: v.to(device) if torch.is_tensor(v) else v
                             for k, v in collate([{"input_ids": s.tolist()} for s in step[rank]]).items()}  # fmt: skip
                    assert batch["num_items_in_batch"] == n_global
                else:
                    batch = packed_inputs(step[rank], device)
                    batch["num_items_in_batch"] = n_global
                out = wrapped(**batch, use_cache=False)
                backward(out.loss * world)  # the gradient average divides the world size out again
                opt.step()
                opt.zero_grad(set_to_none=True)
    calls = collective_counts(prof)
    if args.trace and rank == 0:
        prof.export_chrome_trace(args.trace)
    trained = full_parameters(trained_model)
    gathered = [None] * world
    dist.all_gather_object(gathered, calls)

    bench = run_bench(wrapped, opt, backward, args, device, vocab, rank, world) if args.bench and wrapped else None

    if rank == 0:
        expected = train_padded(reference, batches, args, device)
        worst, where = 0.0, ""
        for name, value in expected.items():
            err = float((trained[name] - value).abs().max())
            if err > worst:
                worst, where = err, name
        result = dict(
            engine=args.engine,
            # what the engine really built (accelerate may fall back to DDP)
            wrapper=type(wrapped if wrapped is not None else trained_model).__name__,
            sequence_parallel=args.sequence_parallel,
            model_type=args.model_type,
            dtype=args.dtype,
            applied=not args.no_apply,
            world=world,
            steps=args.steps,
            tokens_per_rank=[[sum(len(s) for s in step[r]) for r in range(world)] for step in batches],
            max_param_diff=worst,
            worst_param=where,
            relative_update_diff=update_difference(trained, expected, initial),
            collectives_per_rank=gathered,
            bench=bench,
        )
        if reference32 is not None:
            # bf16's own noise: the padded run in this dtype against the same run in float32
            result["relative_update_noise"] = update_difference(
                expected, train_padded(reference32, batches, args, device), initial
            )
        print(json.dumps(result))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f)
    # every rank leaves together: a gloo rank that tears its group down while another still
    # works (rank 0's padded reference above) sometimes never exits (seen in CI: 1 launch in 6)
    dist.barrier()
    # the results are written; should gloo's or the profiler's teardown still hang, leave anyway
    watchdog = threading.Timer(30, _leave_hung_teardown)
    watchdog.daemon = True
    watchdog.start()
    dist.destroy_process_group()


def _leave_hung_teardown() -> None:
    print("distributed_equivalence: teardown hung for 30 s after the results; exiting", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
