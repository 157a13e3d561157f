"""FA4 gradients three ways on one varlen causal GQA batch, per head dim: FA4's own autograd
function, hf_varlen's custom ops, and the fp32 reference. Separates a kernel limit from an adapter bug.

    PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages python3 scripts/fa4_grad_probe.py
"""

import torch

from hf_varlen_patch import Boundaries
from hf_varlen_patch.backends import AttentionSpec, flash
from hf_varlen_patch.backends.reference import reference_attention

lengths = [5, 9, 3, 11, 40, 64, 2, 17]
cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
b = Boundaries.from_cu_seqlens(cu, max(lengths), shape=(1, sum(lengths)))
fn = flash._flash()[0]
for hd in (16, 32, 64, 128):
    for hq, hk in ((4, 4), (4, 2)):
        torch.manual_seed(0)
        q = torch.randn(sum(lengths), hq, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(sum(lengths), hk, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(sum(lengths), hk, hd, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dout = torch.randn(sum(lengths), hq, hd, device="cuda", dtype=torch.bfloat16)
        ref = reference_attention(q.float(), k.float(), v.float(), b, AttentionSpec())
        g_ref = torch.autograd.grad(ref, (q, k, v), dout.float())
        out = fn(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=64, max_seqlen_k=64, causal=True)
        out = out[0] if isinstance(out, tuple) else out
        g_pub = torch.autograd.grad(out, (q, k, v), dout)
        ours = flash.flash_varlen_attention(q, k, v, b, AttentionSpec())
        g_ours = torch.autograd.grad(ours, (q, k, v), dout)

        def rel(a, r):
            return max(float((x.float() - y.float()).norm() / y.float().norm()) for x, y in zip(a, r))

        print(
            f"hd {hd} heads {hq}/{hk}: out ours-vs-ref {float((ours.float() - ref).norm() / ref.norm()):.1e}; "
            f"grads public-vs-ref {rel(g_pub, g_ref):.1e}, ours-vs-ref {rel(g_ours, g_ref):.1e}, "
            f"ours-vs-public {rel(g_ours, g_pub):.1e}",
            flush=True,
        )
