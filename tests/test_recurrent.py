"""The boundary-aware recurrent ops against naive per-sequence references (token by token, each
sequence alone), on layouts where sequences end inside a chunk, span chunks and fill one exactly;
and the same ops without boundaries visibly leaking, so the checks can fail."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_varlen_patch.recurrent import torch_ops

LAYOUTS = [[[5, 13, 2, 20]], [[40]], [[1, 1, 30, 8], [16, 16, 8]], [[7, 9], [3, 13]]]


@pytest.fixture(autouse=True)
def float64():
    """Exact maths: the references and the ops agree to float64 rounding."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def seq_ids(rows):
    """(batch, length) ids, numbered over the flattened rows like Boundaries.seq_idx."""
    out, n = [], 0
    for row in rows:
        ids = []
        for length in row:
            ids += [n] * length
            n += 1
        out.append(ids)
    width = max(map(len, out))
    assert all(len(r) == width for r in out), "pad rows to one width"
    return torch.tensor(out)


def spans(rows):
    for r, row in enumerate(rows):
        start = 0
        for length in row:
            yield r, start, length
            start += length


def equal_rows(rows):
    width = max(sum(r) for r in rows)
    return [r + ([width - sum(r)] if sum(r) < width else []) for r in rows]


# ------------------------------------------------------------------ convolution


def naive_conv(x, weight, bias):
    width = weight.shape[-1]
    return F.conv1d(x, weight[:, None], bias, padding=width - 1, groups=x.shape[1])[..., : x.shape[-1]]


@pytest.mark.parametrize("rows", LAYOUTS)
@pytest.mark.parametrize("width", [2, 4])
def test_causal_conv1d_stops_at_sequence_starts(rows, width):
    rows = equal_rows(rows)
    seq = seq_ids(rows)
    batch, length = seq.shape
    x, weight, bias = torch.randn(batch, 6, length), torch.randn(6, width), torch.randn(6)
    out = torch_ops.causal_conv1d(x, weight, bias, seq, F.silu)
    for r, s, n in spans(rows):
        ref = F.silu(naive_conv(x[r : r + 1, :, s : s + n], weight, bias))
        torch.testing.assert_close(out[r : r + 1, :, s : s + n], ref)
    leaky = torch_ops.causal_conv1d(x, weight, bias, torch.zeros_like(seq), F.silu)
    if any(len(r) > 1 for r in rows):
        assert (leaky - out).abs().max() > 1e-2


# ------------------------------------------------------------------ Mamba2 SSD


def naive_ssd(x, dt, A, B, C, D, initial=None):
    """Token recurrence of one sequence: h = exp(dt*A) h + dt * x B^T; y = h C + D x."""
    length, heads, head_dim = x.shape
    groups = B.shape[1]
    rep = heads // groups
    h = torch.zeros(heads, head_dim, B.shape[-1]) if initial is None else initial.clone()
    ys = []
    for t in range(length):
        Bt, Ct = B[t].repeat_interleave(rep, 0), C[t].repeat_interleave(rep, 0)
        h = torch.exp(dt[t] * A)[:, None, None] * h + (dt[t][:, None, None] * x[t][..., None] * Bt[:, None, :])
        ys.append((h * Ct[:, None, :]).sum(-1) + D[:, None] * x[t])
    return torch.stack(ys), h


@pytest.mark.parametrize("rows", LAYOUTS)
@pytest.mark.parametrize("chunk", [4, 16, 64])
def test_chunked_ssd_scan_resets_at_sequence_starts(rows, chunk):
    rows = equal_rows(rows)
    seq = seq_ids(rows)
    batch, length = seq.shape
    heads, head_dim, groups, state = 4, 3, 2, 5
    x = torch.randn(batch, length, heads, head_dim)
    dt = torch.rand(batch, length, heads) * 0.1  # slow decay: state survives tens of tokens
    A = -torch.rand(heads) * 0.5
    B, C = torch.randn(batch, length, groups, state), torch.randn(batch, length, groups, state)
    D = torch.randn(heads)
    initial = torch.randn(batch, heads, head_dim, state)
    out, final = torch_ops.chunked_ssd_scan(
        x, dt, A, B, C, chunk, seq, D=D, initial_states=initial, return_final_states=True
    )
    for r, s, n in spans(rows):
        first = s == 0
        ref, h = naive_ssd(x[r, s : s + n], dt[r, s : s + n], A, B[r, s : s + n], C[r, s : s + n], D,
                           initial[r] if first else None)  # fmt: skip
        torch.testing.assert_close(out[r, s : s + n], ref)
        if s + n == length:
            torch.testing.assert_close(final[r], h)
    leaky = torch_ops.chunked_ssd_scan(x, dt, A, B, C, chunk, torch.zeros_like(seq), D=D, initial_states=initial)
    if any(len(r) > 1 for r in rows):
        assert (leaky - out).abs().max() > 1e-2


# ------------------------------------------------------------------ Mamba1 selective scan


@pytest.mark.parametrize("rows", LAYOUTS)
def test_selective_scan_resets_at_sequence_starts(rows):
    rows = equal_rows(rows)
    seq = seq_ids(rows)
    batch, length = seq.shape
    d, n = 6, 4
    u, delta = torch.randn(batch, d, length), torch.rand(batch, d, length) * 0.1
    A, B, C = -torch.rand(d, n) * 0.5, torch.randn(batch, n, length), torch.randn(batch, n, length)
    D, z = torch.randn(d), torch.randn(batch, d, length)
    out = torch_ops.selective_scan(u, delta, A, B, C, seq, D=D, z=z)
    for r, s, ln in spans(rows):
        h, ys = torch.zeros(d, n), []
        for t in range(s, s + ln):
            h = torch.exp(delta[r, :, t, None] * A) * h + delta[r, :, t, None] * B[r, None, :, t] * u[r, :, t, None]
            ys.append(h @ C[r, :, t] + D * u[r, :, t])
        ref = torch.stack(ys, -1) * F.silu(z[r, :, s : s + ln])
        torch.testing.assert_close(out[r, :, s : s + ln], ref)


def test_linear_scan_matches_a_loop():
    decay, inputs = torch.rand(3, 37, 5), torch.randn(3, 37, 5)
    decay[:, [0, 9, 10, 30]] = 0.0
    states = torch_ops.linear_scan(decay, inputs, dim=1)
    h = torch.zeros(3, 5)
    for t in range(37):
        h = decay[:, t] * h + inputs[:, t]
        torch.testing.assert_close(states[:, t], h)


# ------------------------------------------------------------------ gated delta rule / KDA


def naive_delta_rule(q, k, v, g, beta, initial=None):
    """One sequence, token by token: S = exp(g) S; S += k (beta (v - k S)); o = q S (q scaled)."""
    length, heads, dk = q.shape
    S = torch.zeros(heads, dk, v.shape[-1]) if initial is None else initial.clone()
    q = torch_ops.l2_normalize(q) * dk**-0.5
    k = torch_ops.l2_normalize(k)
    outs = []
    for t in range(length):
        decay = g[t].exp()
        S = S * (decay[:, :, None] if decay.ndim == 2 else decay[:, None, None])
        delta = (v[t] - torch.einsum("hk,hkv->hv", k[t], S)) * beta[t][:, None]
        S = S + k[t][:, :, None] * delta[:, None, :]
        outs.append(torch.einsum("hk,hkv->hv", q[t], S))
    return torch.stack(outs), S


@pytest.mark.parametrize("rows", LAYOUTS)
@pytest.mark.parametrize("per_dim", [False, True], ids=["gated_deltanet", "kda"])
@pytest.mark.parametrize("chunk", [8, 16])
def test_chunked_delta_rule_resets_at_sequence_starts(rows, per_dim, chunk):
    rows = equal_rows(rows)
    seq = seq_ids(rows)
    batch, length = seq.shape
    heads, dk, dv = 2, 4, 3
    q, k, v = (
        torch.randn(batch, length, heads, dk),
        torch.randn(batch, length, heads, dk),
        torch.randn(batch, length, heads, dv),
    )
    g = -torch.rand(batch, length, heads, *([dk] if per_dim else [])) * 0.05  # slow decay
    beta = torch.rand(batch, length, heads)
    initial = torch.randn(batch, heads, dk, dv)
    out, final = torch_ops.chunked_delta_rule(
        q, k, v, g, beta, seq, chunk_size=chunk, initial_state=initial, output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )  # fmt: skip
    for r, s, n in spans(rows):
        ref, S = naive_delta_rule(q[r, s : s + n], k[r, s : s + n], v[r, s : s + n], g[r, s : s + n],
                                  beta[r, s : s + n], initial[r] if s == 0 else None)  # fmt: skip
        torch.testing.assert_close(out[r, s : s + n], ref)
        if s + n == length:
            torch.testing.assert_close(final[r], S)
    leaky, _ = torch_ops.chunked_delta_rule(
        q, k, v, g, beta, torch.zeros_like(seq), chunk_size=chunk, use_qk_l2norm_in_kernel=True
    )
    if any(len(r) > 1 for r in rows):
        assert (leaky - out).abs().max() > 1e-2


def test_delta_rule_grouped_value_heads():
    """More value heads than key heads (Qwen3-Next): each key head serves consecutive value heads."""
    rows = [[6, 10]]
    seq = seq_ids(rows)
    q, k = torch.randn(1, 16, 2, 4), torch.randn(1, 16, 2, 4)
    v, g, beta = torch.randn(1, 16, 4, 3), -torch.rand(1, 16, 4) * 0.05, torch.rand(1, 16, 4)
    out, _ = torch_ops.chunked_delta_rule(q, k, v, g, beta, seq, chunk_size=8, use_qk_l2norm_in_kernel=True)
    qr, kr = q.repeat_interleave(2, dim=2), k.repeat_interleave(2, dim=2)
    for _, s, n in spans(rows):
        ref, _ = naive_delta_rule(
            qr[0, s : s + n], kr[0, s : s + n], v[0, s : s + n], g[0, s : s + n], beta[0, s : s + n]
        )
        torch.testing.assert_close(out[0, s : s + n], ref)
    assert math.isfinite(float(out.abs().sum()))
