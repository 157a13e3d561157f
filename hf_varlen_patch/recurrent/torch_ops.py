"""Boundary-aware pure-PyTorch convolution and scans: exact on any device and dtype.

Each op takes ``seq_idx`` (batch, length): the sequence every token belongs to, non-decreasing
along a row (``Boundaries.seq_idx_rows()``). A token never reads a tap, a state or a pair term of
another sequence, so one packed call equals each sequence run alone. All work is batched over the
whole row: no per-sequence loop. The maths follow the upstream reference paths they replace
(transformers' torch fallbacks), with the boundary masks the fused kernels apply
(mamba_ssm's seq_idx, causal_conv1d's channel-last seq_idx, flash-linear-attention's cu_seqlens).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "causal_conv1d",
    "chunked_ssd_scan",
    "selective_scan",
    "chunked_delta_rule",
    "linear_scan",
    "l2_normalize",
]


def _shift_right(x: torch.Tensor, by: int, fill: float | int = 0) -> torch.Tensor:
    """``x`` moved ``by`` steps later along its last dim, the first ``by`` entries ``fill``."""
    if by == 0:
        return x
    return F.pad(x[..., :-by], (by, 0), value=fill) if x.shape[-1] > by else torch.full_like(x, fill)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Depthwise causal convolution over (batch, channels, length) whose taps stop at sequence starts.

    ``weight`` is (channels, width); tap ``width - 1 - s`` multiplies the input ``s`` steps back,
    and is dropped wherever that step lies in another sequence (as causal_conv1d's seq_idx does).
    Computed in ``weight``'s dtype like the upstream reference, returned in ``x``'s.
    """
    width = weight.shape[-1]
    xw = x.to(weight.dtype)
    seq = seq_idx.to(torch.int64)
    out = xw * weight[:, width - 1, None]
    for s in range(1, width):
        same = (seq == _shift_right(seq, s, fill=-1)).to(xw.dtype)[:, None, :]
        out = out + _shift_right(xw, s) * same * weight[:, width - 1 - s, None]
    if bias is not None:
        out = out + bias[:, None]
    if activation is not None:
        out = activation(out)
    return out.to(x.dtype)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32 (upstream computes scans in float32; float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _segment_sum(x: torch.Tensor) -> torch.Tensor:
    """[..., i, j] = x[..., j+1] + ... + x[..., i] for j <= i, -inf above the diagonal."""
    n = x.shape[-1]
    lower = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)
    cs = x[..., None].expand(*x.shape, n).masked_fill(~lower, 0).cumsum(dim=-2)
    return cs.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=x.device).tril(0), float("-inf"))


def _chunk_ids(seq_idx: torch.Tensor, pad: int, chunk: int) -> torch.Tensor:
    """(batch, chunks, chunk) sequence ids, the padded tail continuing the row's last sequence."""
    seq = seq_idx.to(torch.int64)
    if pad:
        seq = torch.cat([seq, seq[:, -1:].expand(-1, pad)], dim=1)
    return seq.reshape(seq.shape[0], -1, chunk)


def _incoming_ids(ids: torch.Tensor) -> torch.Tensor:
    """(batch, chunks): the sequence of the state entering each chunk (the row's first for chunk 0)."""
    return torch.cat([ids[:, :1, 0], ids[:, :-1, -1]], dim=1)


def chunked_ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    seq_idx: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba2's chunked state-space-duality scan with mamba_ssm's seq_idx masks.

    Shapes as transformers' ``mamba2_chunk_scan``: x (b, l, h, p), dt (b, l, h), A (h,), B and C
    (b, l, g, n). Four masks keep sequences apart: intra-chunk pairs of one sequence only; a
    chunk's state sums only its last sequence's tokens; a state passes to later chunks only while
    the sequence continues; a token reads the incoming state only if it continues that state's
    sequence. ``initial_states`` belong to each row's first sequence; the final state to its last.
    Output in at least float32, like the upstream reference.
    """
    batch, length, heads, head_dim = x.shape
    groups = B.shape[2]
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    dt = _acc(torch.clamp(dt, min=dt_limit[0], max=dt_limit[1]))
    x = _acc(x)
    B = _acc(B).repeat_interleave(heads // groups, dim=2, output_size=heads)
    C = _acc(C).repeat_interleave(heads // groups, dim=2, output_size=heads)
    pad = (chunk_size - length % chunk_size) % chunk_size
    residual = None if D is None else D[..., None] * F.pad(x, (0, 0, 0, 0, 0, pad))

    def chunks(t: torch.Tensor) -> torch.Tensor:
        t = F.pad(t, (0, 0) * (t.ndim - 2) + (0, pad))
        return t.reshape(batch, -1, chunk_size, *t.shape[2:])

    xs, Bs, Cs = chunks(x * dt[..., None]), chunks(B), chunks(C)
    Adt = chunks(_acc(A) * dt).permute(0, 3, 1, 2)  # (b, h, c, l)
    ids = _chunk_ids(seq_idx, pad, chunk_size)  # (b, c, l)
    incoming = _incoming_ids(ids)
    A_cs = Adt.cumsum(dim=-1)

    same = (ids[..., :, None] == ids[..., None, :])[:, None]  # (b, 1, c, l, s)
    pair_decay = torch.exp(_segment_sum(Adt)) * same
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cs, Bs, pair_decay, xs)

    writes = (ids == ids[..., -1:])[:, None]  # tokens of the chunk's last sequence
    decay_to_end = torch.exp(A_cs[..., -1:] - A_cs) * writes
    written = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bs, decay_to_end, xs)  # (b, c, h, p, n)
    # The state after each chunk: the chunk states written so far (c x c, not upstream's (c+1) x (c+1)
    # with the initial state as a padded chunk -1: inductor's stride check on that square's saved
    # transpose bounds Mod(c + 1, (c + 1)**2) as a negative power and fails, ValueRangeError [0:-1]).
    ends = ids[:, :, -1]  # (b, c): whose state each chunk writes
    passes = (ends[:, :, None] == ends[:, None, :])[:, None]  # (b, 1, target, source)
    chunk_decay = torch.exp(_segment_sum(A_cs[..., -1])) * passes
    after = torch.einsum("bhcz,bzhpn->bchpn", chunk_decay, written)
    if initial_states is None:
        first = torch.zeros_like(written[:, :1])
    else:
        first = initial_states[:, None].to(written)
        carried = torch.exp(A_cs[..., -1].cumsum(dim=-1)) * (ends == incoming[:, :1])[:, None]  # (b, h, c)
        after = after + torch.einsum("bhc,bhpn->bchpn", carried, first[:, 0])
    states, final_state = torch.cat([first, after[:, :-1]], dim=1), after[:, -1]

    reads = (ids == incoming[..., None])[:, None]
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cs, states, torch.exp(A_cs) * reads)
    out = (y_diag + y_off).reshape(batch, -1, heads, head_dim)
    if residual is not None:
        out = out + residual
    out = out[:, :length].contiguous()
    return (out, final_state) if return_final_states else out


def linear_scan(decay: torch.Tensor, inputs: torch.Tensor, dim: int) -> torch.Tensor:
    """All states of h_t = decay_t * h_{t-1} + inputs_t along ``dim`` (h_{-1} = 0), by doubling:
    log2(length) batched steps instead of a loop over tokens. A zero decay resets the state."""
    decay, states = decay.movedim(dim, -1), inputs.movedim(dim, -1)
    decay = decay.expand_as(states)
    length, step = states.shape[-1], 1
    while step < length:
        states = states + decay * _shift_right(states, step)
        decay = decay * _shift_right(decay, step, fill=1.0)
        step *= 2
    return states.movedim(-1, dim)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    seq_idx: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mamba1's selective scan (mamba_ssm's ``selective_scan_fn`` layout) with the state reset at
    every sequence start: the carried state's decay is zero on a sequence's first token.

    u, delta (b, d, l); A (d, n); B, C (b, n, l). Returns (b, d, l) in u's dtype.
    """
    dtype = u.dtype
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    seq = seq_idx.to(torch.int64)
    delta = _acc(delta)
    keeps = (seq == _shift_right(seq, 1, fill=-1)).to(delta.dtype)  # (b, l)
    decay = torch.exp(_acc(A)[None, :, None, :] * delta[..., None]) * keeps[:, None, :, None]
    inputs = delta[..., None] * _acc(B).transpose(1, 2)[:, None] * _acc(u)[..., None]
    states = linear_scan(decay, inputs, dim=2)  # (b, d, l, n)
    out = torch.einsum("bdln,bnl->bdl", states.to(dtype), C.to(dtype))
    if D is not None:
        out = out + u * D[None, :, None]
    if z is not None:
        out = out * F.silu(z)
    out = out.to(dtype)
    return (out, states[:, :, -1].to(dtype)) if return_last_state else out


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """flash-linear-attention's l2 norm (adds eps inside the root)."""
    return x * torch.rsqrt((x * x).sum(dim=dim, keepdim=True) + eps)


def chunked_delta_rule(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    seq_idx: torch.Tensor,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    normalize: Callable[[torch.Tensor], torch.Tensor] = l2_normalize,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gated delta rule (Gated DeltaNet; Kimi Delta Attention when ``g`` has a key dim) in
    chunks, with the recurrent state reset at every sequence start.

    query, key (b, l, h_k, k); value (b, l, h, v); beta (b, l, h); g, the log decay, (b, l, h)
    or (b, l, h, k). Inside a chunk only pairs of one sequence interact (so the triangular
    system is solved per sequence), only the incoming state's sequence reads it, only the chunk's
    last sequence writes the outgoing one, and the state is dropped where a sequence starts.
    Returns the output (b, l, h, v) in query's dtype and the final state (b, h, k, v) or None.
    """
    dtype = query.dtype
    batch, length, key_heads, _ = key.shape
    heads = value.shape[2]
    if key_heads != heads:
        query = query.repeat_interleave(heads // key_heads, dim=2)
        key = key.repeat_interleave(heads // key_heads, dim=2)
    per_dim = g.ndim == 4
    query, key, value, beta, g = (_acc(t.transpose(1, 2)).contiguous() for t in (query, key, value, beta, g))
    if use_qk_l2norm_in_kernel:
        query, key = normalize(query), normalize(key)
    query = query * query.shape[-1] ** -0.5
    pad = (chunk_size - length % chunk_size) % chunk_size

    def chunks(t: torch.Tensor, vector: bool) -> torch.Tensor:
        t = F.pad(t, (0, 0, 0, pad) if vector else (0, pad))
        return t.reshape(t.shape[0], t.shape[1], -1, chunk_size, *t.shape[3:])

    q, k, v = chunks(query, True), chunks(key, True), chunks(value, True)
    beta = chunks(beta, False)
    G = (chunks(g, True) if per_dim else chunks(g, False)[..., None]).cumsum(dim=3)  # (b, h, c, l, k or 1)
    ids = _chunk_ids(seq_idx, pad, chunk_size)  # (b, c, l)
    incoming = _incoming_ids(ids)
    lower = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    pairs = ((ids[..., :, None] == ids[..., None, :]) & lower)[:, None]  # (b, 1, c, l, s)
    reads = (ids == incoming[..., None])[:, None, :, :, None].to(q.dtype)
    writes = (ids == ids[..., -1:])[:, None, :, :, None].to(q.dtype)
    carries = (incoming == ids[..., -1])[:, None, :, None].to(q.dtype)  # no start inside the chunk

    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    if per_dim:
        pair_decay = (G[..., :, None, :] - G[..., None, :, :]).masked_fill(~pairs[..., None], float("-inf")).exp()
        system = (k_beta[..., :, None, :] * k[..., None, :, :] * pair_decay).sum(-1)
        intra = (q[..., :, None, :] * k[..., None, :, :] * pair_decay).sum(-1)
    else:
        pair_decay = (G[..., :, None, 0] - G[..., None, :, 0]).masked_fill(~pairs, float("-inf")).exp()
        system = (k_beta @ k.transpose(-1, -2)) * pair_decay
        intra = (q @ k.transpose(-1, -2)) * pair_decay
    system = system.masked_fill(~pairs, 0)
    new_values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    k_cumdecay = torch.linalg.solve_triangular(system, k_beta * G.exp() * reads, upper=False, unitriangular=True)
    q_state = q * G.exp() * reads
    k_state = k * (G[..., -1:, :] - G).exp() * writes
    chunk_decay = G[..., -1, :].exp() * carries  # (b, h, c, k or 1)

    state = q.new_zeros(batch, heads, q.shape[-1], v.shape[-1]) if initial_state is None else initial_state.to(q)
    out = torch.empty_like(v)
    for i in range(q.shape[2]):
        v_new = new_values[:, :, i] - k_cumdecay[:, :, i] @ state
        out[:, :, i] = q_state[:, :, i] @ state + intra[:, :, i] @ v_new
        state = state * chunk_decay[:, :, i, :, None] + k_state[:, :, i].transpose(-1, -2) @ v_new
    out = out.reshape(batch, heads, -1, v.shape[-1])[:, :, :length]
    out = out.transpose(1, 2).to(dtype, memory_format=torch.contiguous_format)
    return out, (state if output_final_state else None)
