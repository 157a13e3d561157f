"""The exact reference backend: block-diagonal attention through SDPA or plain math.

Runs on any device and dtype and supports every feature, at the cost of a (B, T, T) mask per
call. It is the CPU backend, the one CI proves equivalence with, and the fallback for features
no fast kernel has.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..boundaries import Boundaries
from .base import FEATURES, AttentionSpec, Backend, register_backend


def _allowed(boundaries: Boundaries, spec: AttentionSpec) -> torch.Tensor:
    """(B, T, T) boolean: may query i attend key j (same sequence, causal or in one block, in window)."""
    batch, length = boundaries.shape
    seq = boundaries.seq_idx.view(batch, length)
    allowed = seq[:, :, None] == seq[:, None, :]
    i = torch.arange(length, device=seq.device)[:, None]
    j = torch.arange(length, device=seq.device)[None, :]
    if spec.causal:
        order = j <= i
        if boundaries.blocks is not None:  # a block's tokens see each other both ways
            blocks = boundaries.blocks.view(batch, length)
            order = order | ((blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0))
        allowed = allowed & order
    if spec.window is not None:
        # causal layers: transformers' overlay bounds only the past (a block may look further ahead)
        allowed = allowed & (j > i - spec.window)
        if not spec.causal:
            allowed = allowed & (j < i + spec.window)
    return allowed


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    spec: AttentionSpec,
    distance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense attention of q (B, Hq, Lq, D) over k/v (B, Hk, Lk, D) where ``allowed`` (broadcast to
    (B, 1, Lq, Lk)) says so; ``distance`` (Lq, Lk) is |i - j| for ALiBi. -> (B, Hq, Lq, Dv)."""
    hq, hk = q.shape[1], k.shape[1]
    scale = spec.scale if spec.scale is not None else q.shape[-1] ** -0.5
    if spec.softcap is None and spec.sinks is None and spec.alibi_slopes is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=spec.dropout, scale=scale, enable_gqa=hq != hk
        )
    if hq != hk:
        k = k.repeat_interleave(hq // hk, dim=1)
        v = v.repeat_interleave(hq // hk, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if spec.softcap:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    if spec.alibi_slopes is not None:
        scores = scores - spec.alibi_slopes.to(scores.dtype).view(1, hq, 1, 1) * distance.to(scores.dtype)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if spec.sinks is not None:
        sink = spec.sinks.to(scores.dtype).view(1, hq, 1, 1).expand(*scores.shape[:3], 1)
        scores = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    if spec.sinks is not None:
        probs = probs[..., :-1]
    if spec.dropout:
        probs = F.dropout(probs, p=spec.dropout, training=True)
    return torch.matmul(probs, v)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, boundaries: Boundaries, spec: AttentionSpec
) -> torch.Tensor:
    batch, length = boundaries.shape
    hq = q.shape[1]
    # contiguous first: a (T, H, D) view of head-major q/k (partial rotary's cat, bamba) has a
    # batch stride inductor does not save; AOTAutograd then gives the compiled backward the first
    # dynamic length's strides, and every later length failed its stride assertion
    qb, kb, vb = (t.contiguous().view(batch, length, t.shape[1], -1).transpose(1, 2) for t in (q, k, v))
    distance = None
    if spec.alibi_slopes is not None:
        pos = torch.arange(length, device=q.device)
        distance = (pos[:, None] - pos[None, :]).abs()
    out = masked_attention(qb, kb, vb, _allowed(boundaries, spec)[:, None], spec, distance)
    return out.transpose(1, 2).reshape(batch * length, hq, -1)


register_backend(
    Backend(
        name="sdpa",
        fn=reference_attention,
        features=lambda: frozenset(FEATURES),
        availability=lambda device, dtype: None,
        description="exact block-diagonal reference (SDPA or math); any device and dtype",
    )
)
