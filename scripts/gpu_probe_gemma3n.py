"""Where do gemma3n_text's NaN gradients come from on the GPU (bf16)? Separate vs packed, per backend."""

import copy

import torch

import hf_varlen_patch
from hf_varlen_patch.testing import make_packed_batch, run_packed, run_separate, tiny_model

fp32 = tiny_model("gemma3n_text", device="cuda").train()
batch = make_packed_batch([[5, 9, 3, 11, 40], [64, 2, 17]], fp32.config.vocab_size, extra_padding=5, seed=11)
for dtype in (torch.float32, torch.bfloat16):
    model = copy.deepcopy(fp32).to(dtype)
    sep = run_separate(model, batch)
    print(dtype, "separate NaN grads:", sorted(k for k, g in sep.grads.items() if not torch.isfinite(g).all())[:5])
    for backend in ("sdpa", "torch", "flex"):
        hf_varlen_patch.apply(model, backend=backend)
        try:
            packed = run_packed(model, batch, use_cache=None)
            bad = sorted(k for k, g in packed.grads.items() if not torch.isfinite(g).all())
            err = max(float((a - b).abs().max()) for a, b in zip(packed.logits, sep.logits))
            print(f"  {backend}: logits err {err:.2e}; NaN grads {bad[:5]}")
        except Exception as e:  # report, go on
            print(f"  {backend}: {type(e).__name__}: {str(e)[:200]}")
        hf_varlen_patch.unapply(model)
