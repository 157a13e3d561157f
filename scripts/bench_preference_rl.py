"""Padded vs ``unpad=True`` on preference / RL workloads (TRL-shaped DPO and GRPO), per real token.

Workloads (``--workloads``, all by default), each timed on identical batches for every variant:
  dpo            one DPO step: ``--pairs`` preference pairs, rows built as TRL's DPO collator does
                 ([prompt+chosen for each pair] then [prompt+rejected for each pair], right-padded
                 to the longest row, a completion mask); policy forward with grad through the base
                 model (``model.model(input_ids, attention_mask)``), a TRL-like head scoring only
                 completion positions (chunks of ``--chunk-tokens`` tokens, the LM head's matmul in
                 the weights' dtype with float32 logits and log_softmax, as TRL's fused head and
                 token_logprobs do (``--head-fp32``: a float32 matmul); recomputed in backward per
                 chunk, so no (tokens, vocab) logits persist),
                 per-row sums; a frozen reference copy under no_grad with the same head; DPO sigmoid
                 loss (beta 0.1); backward; AdamW step; zero_grad.
  grpo_logprobs  GRPO's log-prob pass: ``--prompts`` prompts x ``--group`` completions, prompts
                 LEFT-padded, completions RIGHT-padded, concatenated (padding on both sides of a
                 row, as TRL's GRPO); completion-token log-probs under no_grad, in micro-batches of
                 ``--micro-batch`` rows (TRL's batch chunking), same head.
  grpo_train     the other half of a GRPO step on the same batches: per micro-batch forward with
                 grad, loss = -sum(completion log-prob x advantage) / completion tokens (random
                 advantages per row), backward (gradient accumulation); zero_grad, no optimizer step.

Variants: ``padded`` (the unpatched model, SDPA with the padding mask), ``unpad`` (the same model
after ``hf_varlen_patch.apply(model, unpad=True)``, the reference copy too; unapplied after), and
for grpo_logprobs ``hf_varlen_patch.token_logprobs`` on the patched model, per micro-batch and in
one call over all rows. Before timing, the policy's completion log-probs of the first DPO batch
(right padding) must agree between padded and unpad (bf16: max |diff| <= 0.5 and mean <= 0.1, where
bf16 noise measured ~0.08 / ~0.015 and a cross-sequence leak ~3.9 / ~0.8 on this model on CPU; float32:
1e-4 / 1e-5), else the run stops before timing; the padded run against each row alone is printed
for scale. On the first GRPO batch (left padding) they are only reported: upstream numbers a
left-padded row's positions from the row start, unpad from each sequence's first real token.

Lengths are long-tailed (lognormal, clipped), drawn anew every step from a seed fixed per step, so
every variant sees the same batches: prompts 50-600 tokens, DPO completions 20-900, GRPO
completions 50-2000. Token ids are random (pad id 0 never appears as a real token).

Models (``--model``): ``llama`` (default), Llama-3.2-1B-shaped (hidden 2048, 16 layers, 32/8 heads,
intermediate 8192, vocab 128256, tied embeddings, rope theta 500000), random init, bf16, SDPA;
``qwen3_5``: the ~0.5B Qwen3.5-style hybrid of ``bench_hybrid.py`` (Gated DeltaNet + full attention
3:1), cast to bf16, with ``--pairs 4 --micro-batch 4`` by default (upstream's torch reference of
the gated delta rule keeps ~2.5x the Llama's activations per token for backward).

    python scripts/bench_preference_rl.py                       # llama, H100: about 1-2 minutes
    python scripts/bench_preference_rl.py --model qwen3_5
    python scripts/bench_preference_rl.py --tiny                # CPU smoke test, float32
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_common import Result, device_name, failed_result, time_steps, write_outputs  # noqa: E402

WORKLOADS = ("dpo", "grpo_logprobs", "grpo_train")

#: (median, sigma, low, high) of each length distribution (lognormal, clipped); tiny mode divides by 20
LENGTHS = {
    "prompt": (200, 0.7, 50, 600),
    "dpo_completion": (300, 0.8, 20, 900),
    "grpo_completion": (500, 0.8, 50, 2000),
}

LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=8192,
)  # fmt: skip
LLAMA_TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=256, tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=512,
)  # fmt: skip

#: --model -> defaults of --pairs and --micro-batch (printed). The hybrid halves both: upstream's
#: torch reference of the gated delta rule saves ~4.6 MB per token for backward in bf16 (the Llama
#: ~1.9 MB), so 16 DPO rows padded to 1500 tokens would need ~110 GB of activations.
MODEL_DEFAULTS = {"llama": dict(pairs=8, micro_batch=8), "qwen3_5": dict(pairs=4, micro_batch=4)}


# ----------------------------------------------------------------------------------------------
# models


def build_llama(args):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(**(LLAMA_TINY if args.tiny else LLAMA_1B))
    default = torch.get_default_dtype()
    torch.set_default_dtype(args.dtype)  # initialise in the run's dtype on the device: no float32 copy
    try:
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(default)
    return cast_parameters(model, args.dtype).train(), cfg


def build_qwen3_5(args):
    import bench_hybrid

    model, cfg = bench_hybrid.build_hybrid(argparse.Namespace(tiny=args.tiny, device=args.device))
    return cast_parameters(model, args.dtype).train(), cfg


def cast_parameters(model, dtype):
    """Parameters to ``dtype``; buffers (RoPE's float32 inv_freq) left as from_pretrained(dtype=) leaves them."""
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model


BUILDERS = {"llama": build_llama, "qwen3_5": build_qwen3_5}


# ----------------------------------------------------------------------------------------------
# batches


@dataclass
class Rows:
    """A padded batch and where its scored (completion) tokens are, precomputed off the clock."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    src: torch.Tensor  # flat index b * L + t of the hidden state that predicts each scored token
    targets: torch.Tensor  # the scored token ids (input_ids at b * L + t + 1)
    rows: torch.Tensor  # the row of each scored token
    real_tokens: int

    @classmethod
    def build(cls, ids: torch.Tensor, mask: torch.Tensor, completion: torch.Tensor, device: str) -> Rows:
        batch, length = ids.shape
        scored = completion[:, 1:].bool()  # token t + 1 is a completion token, predicted from t
        b, t = scored.nonzero(as_tuple=True)
        src = b * length + t
        return cls(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            src=src.to(device),
            targets=ids.reshape(-1)[src + 1].to(device),
            rows=b.to(device),
            real_tokens=int(mask.sum()),
        )

    @property
    def scored(self) -> int:
        return int(self.src.numel())


@dataclass
class DPOBatch:
    rows: Rows
    pairs: int


@dataclass
class GRPOBatch:
    micro: list[Rows]
    full: Rows
    advantages: list[torch.Tensor]  # per micro-batch, one per row
    left_padded: torch.Tensor  # (B,) rows with padding on the left
    real_tokens: int
    scored: int


def lengths(kind: str, n: int, gen: torch.Generator, tiny: bool) -> list[int]:
    median, sigma, lo, hi = LENGTHS[kind]
    if tiny:
        median, lo, hi = median / 20, max(2, lo // 20), hi // 20
    raw = torch.exp(math.log(median) + sigma * torch.randn(n, generator=gen))
    return raw.round().clamp(lo, hi).long().tolist()


def tokens(n: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(1, vocab, (n,), generator=gen)  # 0 is the pad id


def dpo_batch(step: int, args) -> DPOBatch:
    """TRL's DPO collator: [prompt+chosen]*P then [prompt+rejected]*P, right-padded to the longest."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    prompts = [tokens(n, args.vocab, gen) for n in lengths("prompt", args.pairs, gen, args.tiny)]
    chosen = [tokens(n, args.vocab, gen) for n in lengths("dpo_completion", args.pairs, gen, args.tiny)]
    rejected = [tokens(n, args.vocab, gen) for n in lengths("dpo_completion", args.pairs, gen, args.tiny)]
    seqs = [(p, c) for p, c in zip(prompts, chosen)] + [(p, r) for p, r in zip(prompts, rejected)]
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, (p, c) in enumerate(seqs):
        ids[row, : len(p) + len(c)] = torch.cat([p, c])
        mask[row, : len(p) + len(c)] = 1
        completion[row, len(p) : len(p) + len(c)] = 1
    return DPOBatch(rows=Rows.build(ids, mask, completion, args.device), pairs=args.pairs)


def grpo_batch(step: int, args) -> GRPOBatch:
    """TRL's GRPO layout: prompts left-padded to the longest prompt, completions right-padded."""
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + 500_009 + step)
    prompts = [tokens(n, args.vocab, gen) for n in lengths("prompt", args.prompts, gen, args.tiny)]
    rows = args.prompts * args.group
    completions = [tokens(n, args.vocab, gen) for n in lengths("grpo_completion", rows, gen, args.tiny)]
    p_width, c_width = max(map(len, prompts)), max(map(len, completions))
    ids = torch.zeros(rows, p_width + c_width, dtype=torch.long)
    mask, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, c in enumerate(completions):
        p = prompts[row // args.group]
        ids[row, p_width - len(p) : p_width] = p
        ids[row, p_width : p_width + len(c)] = c
        mask[row, p_width - len(p) : p_width + len(c)] = 1
        completion[row, p_width : p_width + len(c)] = 1
    advantages = torch.randn(rows, generator=gen)
    mb = args.micro_batch
    micro = [
        Rows.build(ids[s : s + mb], mask[s : s + mb], completion[s : s + mb], args.device) for s in range(0, rows, mb)
    ]
    return GRPOBatch(
        micro=micro,
        full=Rows.build(ids, mask, completion, args.device),
        advantages=[advantages[s : s + mb].to(args.device) for s in range(0, rows, mb)],
        left_padded=mask[:, 0] == 0,
        real_tokens=int(mask.sum()),
        scored=sum(m.scored for m in micro),
    )


class Batches:
    """Each (workload, step)'s batch, built once and shared by every variant."""

    def __init__(self, args):
        self.args, self.cache = args, {}

    def get(self, kind: str, step: int):
        key = (kind, step)
        if key not in self.cache:
            self.cache[key] = (dpo_batch if kind == "dpo" else grpo_batch)(step, self.args)
        return self.cache[key]


# ----------------------------------------------------------------------------------------------
# the shared TRL-like head: completion positions only, chunked, recomputed in backward


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, fp32: bool) -> torch.Tensor:
    logits = F.linear(hidden.float(), weight.float()) if fp32 else F.linear(hidden, weight).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def completion_logps(model, hidden: torch.Tensor, rows: Rows, args) -> torch.Tensor:
    """Float32 log-probs of the scored tokens, in ``rows.src`` order (hidden: (B, L, D))."""
    weight = model.get_output_embeddings().weight
    source = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.src)
    pieces = []
    for start in range(0, source.shape[0], args.chunk_tokens):
        h, t = source[start : start + args.chunk_tokens], rows.targets[start : start + args.chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_chunk_logps, h, weight, t, args.head_fp32, use_reentrant=False))
        else:
            pieces.append(_chunk_logps(h, weight, t, args.head_fp32))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def backbone(model, rows: Rows) -> torch.Tensor:
    """The base model's last hidden state, called as TRL's fused log-prob head does."""
    return model.model(input_ids=rows.input_ids, attention_mask=rows.attention_mask, use_cache=False).last_hidden_state


def row_sums(logps: torch.Tensor, rows: Rows, n_rows: int) -> torch.Tensor:
    return logps.new_zeros(n_rows).index_add(0, rows.rows, logps)


# ----------------------------------------------------------------------------------------------
# steps


def dpo_step(policy, ref, opt, batch: DPOBatch, args) -> float:
    rows, n = batch.rows, 2 * batch.pairs
    logps = row_sums(completion_logps(policy, backbone(policy, rows), rows, args), rows, n)
    with torch.no_grad():
        ref_logps = row_sums(completion_logps(ref, backbone(ref, rows), rows, args), rows, n)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    margin = args.beta * ((chosen - rejected) - (ref_chosen - ref_rejected))
    loss = -F.logsigmoid(margin).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(rows.real_tokens)


def grpo_logprobs_step(model, batch: GRPOBatch, args, how: str) -> torch.Tensor:
    """Completion log-probs of the whole batch (micro-batch order), under no_grad."""
    import hf_varlen_patch

    with torch.no_grad():
        if how == "token_logprobs_one_call":
            full = batch.full
            out = hf_varlen_patch.token_logprobs(
                model, full.input_ids, full.attention_mask, chunk_tokens=args.chunk_tokens
            )
            return out.reshape(-1).index_select(0, full.src + 1)
        pieces = []
        for rows in batch.micro:
            if how == "token_logprobs":
                out = hf_varlen_patch.token_logprobs(
                    model, rows.input_ids, rows.attention_mask, chunk_tokens=args.chunk_tokens
                )
                pieces.append(out.reshape(-1).index_select(0, rows.src + 1))
            else:
                pieces.append(completion_logps(model, backbone(model, rows), rows, args))
        return torch.cat(pieces)


def grpo_train_step(model, batch: GRPOBatch, args) -> float:
    for rows, adv in zip(batch.micro, batch.advantages):
        logps = completion_logps(model, backbone(model, rows), rows, args)
        loss = -(logps * adv.index_select(0, rows.rows)).sum() / batch.scored
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(batch.real_tokens)


# ----------------------------------------------------------------------------------------------
# checks


class Patched:
    """``apply(model, unpad=True)`` on the given models for the block's duration (or nothing)."""

    #: apply's backend (``--backend``; set by main)
    backend = "auto"

    def __init__(self, on: bool, *models):
        self.on, self.models = on, [m for m in models if m is not None]

    def __enter__(self):
        import hf_varlen_patch

        if self.on:
            for m in self.models:
                hf_varlen_patch.apply(m, backend=self.backend, unpad=True)
        return self

    def __exit__(self, *exc):
        import hf_varlen_patch

        if self.on:
            for m in self.models:
                hf_varlen_patch.unapply(m)
        return False


def _diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a - b).abs()
    return dict(max_abs_diff=float(d.max()) if d.numel() else 0.0, mean_abs_diff=float(d.mean()) if d.numel() else 0.0)


def alone_hidden(model, rows: Rows) -> torch.Tensor:
    """The base model's hidden states of each right-padded row run alone, without padding (upstream)."""
    lengths = rows.attention_mask.sum(dim=1).tolist()
    hidden = None
    for row, n in enumerate(lengths):
        h = model.model(input_ids=rows.input_ids[row : row + 1, :n], use_cache=False).last_hidden_state
        if hidden is None:
            hidden = h.new_zeros(*rows.input_ids.shape, h.shape[-1])
        hidden[row, :n] = h[0]
    return hidden


def check_dpo(policy, batches: Batches, args) -> dict:
    """Padded vs unpad on the first (right-padded) DPO batch: must agree within the dtype's noise.
    For scale, the padded run against each row run alone (no padding, upstream): the padded run's
    own rounding noise from batch composition alone."""
    batch = batches.get("dpo", 0)
    rows = batch.rows
    with torch.no_grad():
        padded = completion_logps(policy, backbone(policy, rows), rows, args)
        alone = completion_logps(policy, alone_hidden(policy, rows), rows, args)
        with Patched(True, policy):
            unpad = completion_logps(policy, backbone(policy, rows), rows, args)
        n = 2 * batch.pairs
        sums = _diff(row_sums(padded, rows, n), row_sums(unpad, rows, n))
        reference = None
        if next(policy.parameters()).dtype != torch.float32:
            # the bf16 runs' own noise: each against the same padded run in float32
            exact = copy.deepcopy(policy).float()
            reference = completion_logps(exact, backbone(exact, rows), rows, args).float()
            del exact
    own = _diff(padded, alone)
    out = dict(
        **_diff(padded, unpad),
        padded_vs_rows_alone_max_abs_diff=own["max_abs_diff"],
        padded_vs_rows_alone_mean_abs_diff=own["mean_abs_diff"],
        mean_abs_logp=float(padded.abs().mean()),
        row_sum_max_abs_diff=sums["max_abs_diff"],
        scored_tokens=rows.scored,
        tolerance_max=args.check_max_tol,
        tolerance_mean=args.check_mean_tol,
    )
    out["passed"] = out["max_abs_diff"] <= args.check_max_tol and out["mean_abs_diff"] <= args.check_mean_tol
    if reference is not None:
        out["padded_vs_fp32"] = _diff(padded.float(), reference)
        out["unpad_vs_fp32"] = _diff(unpad.float(), reference)
        # within twice the padded bf16 run's own error against float32, max and mean
        out["passed"] = out["passed"] and all(
            out["unpad_vs_fp32"][k] <= 2 * out["padded_vs_fp32"][k] for k in ("max_abs_diff", "mean_abs_diff")
        )
    print(
        f"check DPO batch 0 (right padding, {rows.scored} completion tokens): padded vs unpad log-probs "
        f"max |diff| {out['max_abs_diff']:.3e}, mean |diff| {out['mean_abs_diff']:.3e}, "
        f"mean |log-prob| {out['mean_abs_logp']:.3f}, per-row sums max |diff| {out['row_sum_max_abs_diff']:.3e} "
        f"(tolerance max {args.check_max_tol:g}, mean {args.check_mean_tol:g}): {'PASS' if out['passed'] else 'FAIL'}"
        f"\n  for scale, padded vs each row alone (upstream, no padding): max |diff| "
        f"{own['max_abs_diff']:.3e}, mean |diff| {own['mean_abs_diff']:.3e}",
        flush=True,
    )
    if reference is not None:
        print(
            f"  against the padded run in float32: padded max {out['padded_vs_fp32']['max_abs_diff']:.3e} / mean "
            f"{out['padded_vs_fp32']['mean_abs_diff']:.3e}, unpad max {out['unpad_vs_fp32']['max_abs_diff']:.3e} / "
            f"mean {out['unpad_vs_fp32']['mean_abs_diff']:.3e} (must be within 2x padded's)",
            flush=True,
        )
    return out


def check_grpo(policy, batches: Batches, args) -> dict:
    """On the first GRPO batch (padding on both sides): reported, not asserted."""
    batch = batches.get("grpo", 0)
    padded = grpo_logprobs_step(policy, batch, args, "head")
    with Patched(True, policy):
        unpad = grpo_logprobs_step(policy, batch, args, "head")
        tl = grpo_logprobs_step(policy, batch, args, "token_logprobs")
        tl_one = grpo_logprobs_step(policy, batch, args, "token_logprobs_one_call")
    token_rows = torch.cat([r.rows + i * args.micro_batch for i, r in enumerate(batch.micro)])
    left = batch.left_padded.to(token_rows.device).index_select(0, token_rows)
    out = dict(
        padded_vs_unpad=_diff(padded, unpad),
        padded_vs_unpad_rows_without_left_padding=_diff(padded[~left], unpad[~left]),
        padded_vs_unpad_left_padded_rows=_diff(padded[left], unpad[left]),
        unpad_vs_token_logprobs=_diff(unpad, tl),
        token_logprobs_micro_vs_one_call=_diff(tl, tl_one),
        mean_abs_logp=float(padded.abs().mean()),
        left_padded_rows=int(batch.left_padded.sum()),
        rows=len(batch.left_padded),
    )
    f = lambda d: f"max {d['max_abs_diff']:.3e} / mean {d['mean_abs_diff']:.3e}"  # noqa: E731
    print(
        f"report GRPO batch 0 ({out['left_padded_rows']}/{out['rows']} rows left-padded, {batch.scored} completion "
        f"tokens, mean |log-prob| {out['mean_abs_logp']:.3f}):\n"
        f"  padded vs unpad, all rows:                  {f(out['padded_vs_unpad'])}\n"
        f"  padded vs unpad, rows without left padding: {f(out['padded_vs_unpad_rows_without_left_padding'])}\n"
        f"  padded vs unpad, left-padded rows:          {f(out['padded_vs_unpad_left_padded_rows'])} "
        "(upstream numbers positions from the row start: RoPE makes that the same up to rounding)\n"
        f"  unpad head vs token_logprobs:               {f(out['unpad_vs_token_logprobs'])}\n"
        f"  token_logprobs micro-batched vs one call:   {f(out['token_logprobs_micro_vs_one_call'])}",
        flush=True,
    )
    return out


# ----------------------------------------------------------------------------------------------
# rows


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_row(label: str, step, args, note: str = "") -> Result:
    print(f"running {label} ...", flush=True)
    try:
        result = time_steps(step, steps=args.steps, warmup=args.warmup, row=label, note=note)
    except Exception as err:  # out of memory (torch.OutOfMemoryError) or a failing implementation: reported
        oom = isinstance(err, torch.OutOfMemoryError)
        text = str(err).splitlines()[0][:160] if str(err) else ""
        result = failed_result(label, f"{'CUDA OOM' if oom else type(err).__name__}: {text}")
    _free()
    print(
        f"  {result.median_ms:.1f} ms/step, {result.tokens_per_s:,.0f} real tok/s, {result.peak_gb:.2f} GB "
        f"{result.note}",
        flush=True,
    )
    return result


def dpo_rows(policy, ref, batches: Batches, args) -> list[Result]:
    def row(variant: str) -> Result:
        label = f"DPO step: {'padded (sdpa)' if variant == 'padded' else 'unpad=True'}"
        opt = make_optimizer(policy, args)  # fresh per row: its states die with the row
        with Patched(variant == "unpad", policy, ref):
            return run_row(
                label, lambda i: dpo_step(policy, ref, opt, batches.get("dpo", i), args), args, args.dpo_note
            )

    results = []
    for variant in ("padded", "unpad"):
        results.append(row(variant))
        policy.zero_grad(set_to_none=True)
        _free()
    return results


def grpo_logprob_rows(policy, batches: Batches, args) -> list[Result]:
    def step(how):
        def run(i):
            grpo_logprobs_step(policy, batches.get("grpo", i), args, how)
            return float(batches.get("grpo", i).real_tokens)

        return run

    rows = [
        ("padded", "head", "GRPO log-probs (no_grad): padded (sdpa)"),
        ("unpad", "head", "GRPO log-probs (no_grad): unpad=True"),
        ("unpad", "token_logprobs", "GRPO log-probs (no_grad): token_logprobs"),
        ("unpad", "token_logprobs_one_call", "GRPO log-probs (no_grad): token_logprobs, all rows in one call"),
    ]
    results = []
    for variant, how, label in rows:
        note = args.grpo_one_call_note if how == "token_logprobs_one_call" else args.grpo_note
        with Patched(variant == "unpad", policy):
            results.append(run_row(label, step(how), args, note))
    return results


def grpo_train_rows(policy, batches: Batches, args) -> list[Result]:
    results = []
    for variant in ("padded", "unpad"):
        label = f"GRPO train fwd+bwd: {'padded (sdpa)' if variant == 'padded' else 'unpad=True'}"
        with Patched(variant == "unpad", policy):
            results.append(
                run_row(
                    label, lambda i: grpo_train_step(policy, batches.get("grpo", i), args), args, args.grpo_train_note
                )
            )
        policy.zero_grad(set_to_none=True)
        _free()
    return results


def make_optimizer(model, args):
    params = [p for p in model.parameters() if p.requires_grad]
    if args.device == "cuda":
        return torch.optim.AdamW(params, lr=1e-6, fused=True)
    return torch.optim.AdamW(params, lr=1e-6, foreach=True)


# ----------------------------------------------------------------------------------------------


def device_slug() -> str:
    name = device_name().lower()
    found = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name)
    return found.group(1) if found else re.sub(r"[^a-z0-9]+", "_", name).strip("_")


def batch_summary(batches: Batches, args) -> dict:
    """Mean real and padded tokens per step of each workload (over the steps that will run)."""
    steps = range(args.warmup + args.steps)
    out = {}
    if "dpo" in args.workload_list:
        dpo = [batches.get("dpo", i).rows for i in steps]
        out["dpo"] = dict(
            rows=2 * args.pairs,
            real_tokens=sum(r.real_tokens for r in dpo) / len(dpo),
            padded_tokens=sum(r.input_ids.numel() for r in dpo) / len(dpo),
            completion_tokens=sum(r.scored for r in dpo) / len(dpo),
        )
    if {"grpo_logprobs", "grpo_train"} & set(args.workload_list):
        grpo = [batches.get("grpo", i) for i in steps]
        out["grpo"] = dict(
            rows=args.prompts * args.group,
            real_tokens=sum(b.real_tokens for b in grpo) / len(grpo),
            padded_tokens=sum(b.full.input_ids.numel() for b in grpo) / len(grpo),
            completion_tokens=sum(b.scored for b in grpo) / len(grpo),
        )
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(BUILDERS), default="llama")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, of {', '.join(WORKLOADS)}")
    parser.add_argument("--pairs", type=int, default=None, help="DPO pairs per step, 2x rows (llama 8, qwen3_5 4)")
    parser.add_argument("--prompts", type=int, default=4, help="GRPO prompts per step")
    parser.add_argument("--group", type=int, default=8, help="GRPO completions per prompt")
    parser.add_argument("--micro-batch", type=int, default=None, help="GRPO rows per forward (llama 8, qwen3_5 4)")
    parser.add_argument("--chunk-tokens", type=int, default=4096, help="tokens per LM-head chunk")
    parser.add_argument("--head-fp32", action="store_true", help="LM head matmul in float32 (default: weights' dtype)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--backend", default="auto", help="hf_varlen_patch.apply backend for the unpad rows")
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (non-reentrant) on the policy")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 8; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2; tiny 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-max-tol", type=float, default=None, help="DPO check: max |diff| (bf16 0.5, fp32 1e-4)")
    parser.add_argument(
        "--check-mean-tol", type=float, default=None, help="DPO check: mean |diff| (bf16 0.1, fp32 1e-5)"
    )
    parser.add_argument("--device", default=None, help="cuda when available (tiny: cpu)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny configs, short lengths, float32")
    parser.add_argument("--out", default="benchmarks", help="folder for the .md/.json/.png")
    parser.add_argument("--name", default=None, help="file name (default preference_rl[_qwen3_5]_<device>)")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    args.dtype = torch.float32 if args.tiny else torch.bfloat16
    if args.steps is None:
        args.steps = 2 if args.tiny else 8
    if args.warmup is None:
        args.warmup = 0 if args.tiny else 2
    for key, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    fp32 = args.dtype == torch.float32
    if args.check_max_tol is None:
        args.check_max_tol = 1e-4 if fp32 else 0.5
    if args.check_mean_tol is None:
        args.check_mean_tol = 1e-5 if fp32 else 0.1
    args.workload_list = [w for w in args.workloads.split(",") if w]
    unknown = set(args.workload_list) - set(WORKLOADS)
    if not args.workload_list:
        parser.error("--workloads names none")
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {WORKLOADS}")
    return args


def main(argv=None) -> list[Result]:
    args = parse_args(argv)
    import transformers

    import hf_varlen_patch

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    policy, cfg = BUILDERS[args.model](args)
    args.vocab = cfg.get_text_config().vocab_size if hasattr(cfg, "get_text_config") else cfg.vocab_size
    ref = copy.deepcopy(policy).eval().requires_grad_(False) if "dpo" in args.workload_list else None
    if args.grad_ckpt:  # transformers >= 5.2x names it activation checkpointing
        enable = getattr(policy, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = sum(p.numel() for p in policy.parameters())
    attn = getattr(policy.config, "_attn_implementation", None)
    Patched.backend = args.backend
    backend = args.backend
    if backend == "auto":  # what auto picks for a plain attention layer here
        try:
            picked = hf_varlen_patch.select_backend("auto", torch.device(args.device), args.dtype, frozenset()).name
            backend = f"auto ({picked})"
        except Exception as err:  # reported, not fatal: apply decides per layer anyway
            backend = f"auto (? {type(err).__name__})"
    print(
        f"model {args.model}: {params / 1e6:,.1f}M params, {args.dtype}, attention {attn}, unpad backend {backend}, "
        f"device {args.device} "
        f"({device_name()}); pairs {args.pairs}, prompts {args.prompts} x {args.group}, micro-batch "
        f"{args.micro_batch} (--model {args.model} defaults: "
        f"{', '.join(f'{k} {v}' for k, v in MODEL_DEFAULTS[args.model].items())}), head chunk {args.chunk_tokens} "
        f"tokens ({'float32' if args.head_fp32 else 'model-dtype'} matmul, float32 log_softmax), grad ckpt "
        f"{'on' if args.grad_ckpt else 'off'}, warm-up {args.warmup}, steps {args.steps} "
        f"(built in {time.perf_counter() - t_start:.1f} s)",
        flush=True,
    )

    batches = Batches(args)
    summary = batch_summary(batches, args)
    for kind, s in summary.items():
        print(
            f"{kind} batches: {s['rows']} rows, mean {s['real_tokens']:.0f} real / {s['padded_tokens']:.0f} "
            f"padded tokens per step ({s['real_tokens'] / s['padded_tokens']:.0%} real), "
            f"{s['completion_tokens']:.0f} completion tokens",
            flush=True,
        )
    size = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"
    ckpt = "; grad ckpt" if args.grad_ckpt else ""
    grpo_rows = f"{size}; {args.prompts}x{args.group} rows"
    args.dpo_note = f"{size}; {2 * args.pairs} rows; policy fwd+bwd, ref fwd, AdamW{ckpt}"
    args.grpo_note = f"{grpo_rows} in micro-batches of {args.micro_batch}"
    args.grpo_one_call_note = f"{grpo_rows} in one call"
    args.grpo_train_note = f"{grpo_rows} in micro-batches of {args.micro_batch}; no optimizer step{ckpt}"

    checks: dict = {}
    if "dpo" in args.workload_list:
        checks["dpo"] = check_dpo(policy, batches, args)
        if not checks["dpo"]["passed"]:
            raise SystemExit(
                "padded and unpad=True log-probs of the first right-padded DPO batch disagree beyond the tolerance "
                "(see above); not timing. Loosen --check-max-tol / --check-mean-tol only if this is the dtype's noise."
            )
    if {"grpo_logprobs", "grpo_train"} & set(args.workload_list):
        checks["grpo"] = check_grpo(policy, batches, args)
    _free()

    results: list[Result] = []
    if "dpo" in args.workload_list:
        results += dpo_rows(policy, ref, batches, args)
    del ref
    _free()
    if "grpo_logprobs" in args.workload_list:
        results += grpo_logprob_rows(policy, batches, args)
    if "grpo_train" in args.workload_list:
        results += grpo_train_rows(policy, batches, args)

    model_part = "" if args.model == "llama" else f"_{args.model}"
    name = args.name or f"preference_rl{model_part}{'_tiny' if args.tiny else ''}_{device_slug()}"
    meta = dict(
        device=device_name(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        model=args.model,
        params=params,
        dtype=str(args.dtype),
        attention=attn,
        unpad_backend=backend,
        pairs=args.pairs,
        prompts=args.prompts,
        group=args.group,
        micro_batch=args.micro_batch,
        chunk_tokens=args.chunk_tokens,
        head_fp32=args.head_fp32,
        grad_ckpt=args.grad_ckpt,
        steps=args.steps,
        warmup=args.warmup,
        seed=args.seed,
        lengths={k: dict(zip(("median", "sigma", "low", "high"), v)) for k, v in LENGTHS.items()},
        batches=summary,
        checks=checks,
        wall_s=None,
    )
    model_title = "Llama-3.2-1B-shaped" if args.model == "llama" else "Qwen3.5-style hybrid"
    title = f"{model_title} ({'tiny' if args.tiny else size}): DPO / GRPO, padded vs unpad=True"
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    out = Path(args.out)
    table = write_outputs(results, out, name, title, meta, results[0].row if results else "")
    ratios = ratio_table(results)
    checks_md = checks_markdown(checks)
    print(ratios + "\n" + checks_md, flush=True)
    (out / f"{name}.md").write_text(table + "\n\n" + ratios + "\n\n" + checks_md + "\n")
    print(f"wrote {out / name}.md/.json; total wall {time.perf_counter() - t_start:.1f} s", flush=True)
    return results


def ratio_table(results: list[Result]) -> str:
    """Each row against its workload's padded row: time per real token, tokens/s and peak memory."""
    lines = [
        "| row | ms per 1k real tokens | tokens/s vs padded | peak memory vs padded |",
        "| --- | --- | --- | --- |",
    ]
    padded = {r.row.split(":")[0]: r for r in results if r.row.endswith("padded (sdpa)")}
    for r in results:
        if r.note.startswith("FAILED"):
            lines.append(f"| {r.row} | {r.note} | | |")
            continue
        base = padded.get(r.row.split(":")[0])
        ok = base is not None and not base.note.startswith("FAILED")
        tok = f"{r.tokens_per_s / base.tokens_per_s:.2f}x" if ok and base.tokens_per_s else "-"
        mem = f"{r.peak_gb / base.peak_gb:.2f}x" if ok and base.peak_gb else "-"
        lines.append(f"| {r.row} | {r.ms_per_ktok:.2f} | {tok} | {mem} |")
    return "\n".join(lines)


def checks_markdown(checks: dict) -> str:
    lines = []
    if "dpo" in checks:
        c = checks["dpo"]
        lines.append(
            f"Check, first DPO batch (right padding, {c['scored_tokens']} completion tokens): padded vs unpad "
            f"completion log-probs max |diff| {c['max_abs_diff']:.3e}, mean |diff| {c['mean_abs_diff']:.3e}, "
            f"mean |log-prob| {c['mean_abs_logp']:.3f}; {'PASS' if c['passed'] else 'FAIL'}. For scale, the padded "
            f"run vs each row alone (upstream, no padding): max |diff| {c['padded_vs_rows_alone_max_abs_diff']:.3e}, "
            f"mean |diff| {c['padded_vs_rows_alone_mean_abs_diff']:.3e}."
        )
        if "unpad_vs_fp32" in c:
            lines[-1] += (
                f" Against the padded run in float32 (the bf16 noise): padded max "
                f"{c['padded_vs_fp32']['max_abs_diff']:.3e} / mean {c['padded_vs_fp32']['mean_abs_diff']:.3e}, "
                f"unpad max {c['unpad_vs_fp32']['max_abs_diff']:.3e} / mean {c['unpad_vs_fp32']['mean_abs_diff']:.3e} "
                "(pass: within 2x padded's)."
            )
    if "grpo" in checks:
        c = checks["grpo"]
        lines.append(
            f"Report, first GRPO batch ({c['left_padded_rows']}/{c['rows']} rows left-padded): padded vs unpad max "
            f"|diff| {c['padded_vs_unpad']['max_abs_diff']:.3e} (rows without left padding "
            f"{c['padded_vs_unpad_rows_without_left_padding']['max_abs_diff']:.3e}; left-padded rows "
            f"{c['padded_vs_unpad_left_padded_rows']['max_abs_diff']:.3e}: upstream numbers their positions from "
            "the row start, not asserted); unpad vs token_logprobs "
            f"{c['unpad_vs_token_logprobs']['max_abs_diff']:.3e}."
        )
    return "\n\n".join(lines)


if __name__ == "__main__":
    main()
