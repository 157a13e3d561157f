"""Per-token log-probabilities of a padded batch without its (B, L, vocab) logits.

RL trainers (GRPO, RLOO, PPO) and preference losses need ``log p(token | prefix)`` for every
completion token, not the logits: :func:`token_logprobs` runs the batch's real tokens packed (the
model must be patched), then the LM head chunk by chunk over real tokens only, so at most
``chunk_tokens x vocab`` logits exist at a time (recomputed in backward, not stored).
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .errors import UnsupportedArchitectureError, VarlenPatchError
from .install import find_hf_model, is_patched
from .unpad import plan_unpadding, unpadded_call

__all__ = ["token_logprobs"]

#: How causal LMs post-process their LM head's output, by config key: logits = f(lm_head(h)).
#: A head doing anything else is caught by :func:`_check_head` (one short forward per model).
_HEAD_CAPS = ("final_logit_softcapping",)
_HEAD_SCALES = ("logit_scale",)
_HEAD_DIVISORS = ("logits_scaling",)

#: Models whose head :func:`_check_head` vouched for, per dtype (dropped with the model).
_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _head_logits(hf_model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    config = hf_model.config.get_text_config() if hasattr(hf_model.config, "get_text_config") else hf_model.config
    logits = hf_model.get_output_embeddings()(hidden)
    for key in _HEAD_SCALES:
        if getattr(config, key, None):
            logits = logits * getattr(config, key)
    for key in _HEAD_DIVISORS:
        if getattr(config, key, None):
            logits = logits / getattr(config, key)
    for key in _HEAD_CAPS:
        cap = getattr(config, key, None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
    return logits


def _chunk(hf_model: Any, hidden: torch.Tensor, targets: torch.Tensor, temperature: float, entropies: bool):
    logits = _head_logits(hf_model, hidden).float() / temperature
    logp = F.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not entropies:
        return picked, picked.new_zeros(())
    return picked, -(logp.exp() * logp).sum(-1)


def _check_head(hf_model: torch.nn.Module, base: torch.nn.Module, sample: torch.Tensor) -> None:
    """Hold the head this module computes against the model's own logits, on a few tokens once."""
    dtype = next(hf_model.parameters()).dtype
    if dtype in _CHECKED.get(hf_model, ()):
        return
    with torch.no_grad():
        own = hf_model(input_ids=sample, use_cache=False).logits.float()
        hidden = base(input_ids=sample, use_cache=False).last_hidden_state
        mine = _head_logits(hf_model, hidden).float()
    scale = float(own.abs().max()) or 1.0
    if not torch.allclose(mine, own, atol=1e-3 * scale, rtol=1e-3):
        raise UnsupportedArchitectureError(
            f"{type(hf_model).__name__} post-processes its LM head's output in a way token_logprobs does not "
            f"reproduce (max difference {float((mine - own).abs().max()):.2e}); compute log-probabilities from "
            "model(...).logits instead."
        )
    _CHECKED.setdefault(hf_model, set()).add(dtype)


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
    entropies: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``(B, L)`` float32: at ``[b, t]`` the log-probability of ``input_ids[b, t]`` given the tokens
    before it in its row's sequence (logits divided by ``temperature``, as TRL does), 0 at padding
    and at each sequence's first token (nothing predicts it). With ``entropies``, also the entropy
    of that prediction, laid out alike. Differentiable (the head is recomputed per chunk in
    backward). ``model`` must be patched (:func:`hf_varlen_patch.apply`); padding on the left, the
    right or both, one sequence per row, as with ``unpad=True``.
    """
    if not is_patched(model):
        raise VarlenPatchError("token_logprobs runs the batch packed: call hf_varlen_patch.apply(model) first.")
    if input_ids.ndim != 2 or tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"token_logprobs takes input_ids and attention_mask of one (B, L) shape, got {tuple(input_ids.shape)} "
            f"and {tuple(attention_mask.shape)}"
        )
    if chunk_tokens < 1 or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError("chunk_tokens must be >= 1 and temperature a positive number")
    hf_model = find_hf_model(model)
    base = hf_model.base_model
    batch, length = input_ids.shape
    call = {"input_ids": input_ids, "attention_mask": attention_mask}
    plan = plan_unpadding(call, padded_only=False)
    if plan is None:
        raise ValueError("token_logprobs got a batch without real tokens (attention_mask is all zeros)")
    packed = {k: v for k, v in unpadded_call(call, plan).items() if v is not None and k != "use_cache"}
    ids = packed["input_ids"][0]
    _check_head(hf_model, base, ids[: min(8, int(packed["cu_seq_lens_q"][1]))][None])
    hidden = base(**packed, use_cache=False).last_hidden_state[0]  # (N, D)
    positions = packed["position_ids"][0]
    # token t is predicted from t - 1 unless it starts a sequence
    predicted = positions[1:] > 0
    rows = predicted.nonzero().squeeze(1)
    source, targets = hidden.index_select(0, rows), ids.index_select(0, rows + 1)
    pieces, entropy_pieces = [], []
    for start in range(0, targets.numel(), chunk_tokens):
        h, t = source[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled() and h.requires_grad:
            picked, entropy = checkpoint(_chunk, hf_model, h, t, temperature, entropies, use_reentrant=False)
        else:
            picked, entropy = _chunk(hf_model, h, t, temperature, entropies)
        pieces.append(picked)
        entropy_pieces.append(entropy)
    flat_out = hidden.new_zeros(ids.numel(), dtype=torch.float32)
    if pieces:
        flat_out = flat_out.index_copy(0, rows + 1, torch.cat(pieces))
    out = flat_out.new_zeros(batch * length).index_copy(0, plan.index, flat_out).view(batch, length)
    if not entropies:
        return out
    flat_ent = hidden.new_zeros(ids.numel(), dtype=torch.float32)
    if pieces:
        flat_ent = flat_ent.index_copy(0, rows + 1, torch.cat(entropy_pieces))
    return out, flat_ent.new_zeros(batch * length).index_copy(0, plan.index, flat_ent).view(batch, length)
