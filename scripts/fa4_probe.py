"""The real flash-attn kernel (FA4/FA3/FA2, whichever imports) behind ``apply(backend="flash_attn")``:
bf16 packed vs separate, forward and gradients, on head-dim-64 twins of families that exercise its
features (causal GQA, sliding window, softcap, sinks), next to bf16's own noise (see tests/test_gpu.py).

    PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages python3 scripts/fa4_probe.py
"""

from __future__ import annotations

import copy
import time

import torch
from transformers import AutoModelForCausalLM

import hf_varlen_patch
from hf_varlen_patch.attention import BACKEND_USAGE
from hf_varlen_patch.backends import flash
from hf_varlen_patch.testing import make_packed_batch, relative_errors, run_packed, run_separate, tiny_config

FAMILIES = {"llama": {}, "qwen2": {}, "mistral": {"sliding_window": 24}, "gemma2": {}, "gpt_oss": {}}
LAYOUTS = [dict(rows=[[5, 9, 3, 11, 40], [64, 2, 17]], extra_padding=5, seed=11), dict(rows=[[1, 33, 7, 64, 64, 2]])]


def main() -> None:
    found = flash._flash()
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}; flash module: {found and found[2]}")
    print(f"features: {sorted(flash._features())}")
    for model_type, extra in FAMILIES.items():
        config = tiny_config(model_type, hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
        for key, value in extra.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        fp32 = AutoModelForCausalLM.from_config(config).cuda().train()
        bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
        for layout in LAYOUTS:
            batch = make_packed_batch(vocab_size=config.vocab_size, **layout)
            try:
                truth, separate = run_separate(fp32, batch), run_separate(bf16, batch)
                hf_varlen_patch.apply(bf16, backend="flash_attn")
                BACKEND_USAGE.clear()
                start = time.perf_counter()
                packed = run_packed(bf16, batch, use_cache=None)
                first = time.perf_counter() - start
                noise = relative_errors(separate, truth)
                err = relative_errors(packed, separate)
                ok = err[0] <= 2 * noise[0] and err[1] <= 2 * noise[1]
                print(
                    f"{'PASS' if ok else 'FAIL'} {model_type} rows={layout['rows']}: logits {err[0]:.2e} "
                    f"(noise {noise[0]:.2e}), grads {err[1]:.2e} (noise {noise[1]:.2e}); "
                    f"backend calls {dict(BACKEND_USAGE)}; first packed step {first:.1f} s"
                )
            except Exception as err:  # a refusal or a kernel error is a result to report
                print(f"ERROR {model_type}: {type(err).__name__}: {str(err)[:400]}")
            finally:
                hf_varlen_patch.unapply(bf16)


if __name__ == "__main__":
    main()
