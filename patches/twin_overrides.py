"""Tiny-twin overrides for model_types without an entry of their own, where the default config
would give a twin that misses what the real models have, or that cannot be built or run at all
(see ``hf_varlen_patch.twins``). Each says why; a family with an entry declares its own."""

from __future__ import annotations

from hf_varlen_patch.registry import register_twin_overrides
from hf_varlen_patch.twins import WINDOW, TwinError

# The default LFM2 config is attention-only; released LFM2 models interleave short-convolution
# layers, which the twin must keep (their state would leak across packed sequences).
register_twin_overrides(
    ("lfm2",), {"layer_types": ["conv", "full_attention"], "full_attn_idxs": [1], "num_hidden_layers": 2}
)

# The default LFM2-MoE config leaves layer_types None, which its model cannot build from; released
# models interleave short-convolution and attention layers after dense ones: a dense conv layer,
# then an MoE attention and an MoE conv layer.
register_twin_overrides(("lfm2_moe",), {"layer_types": ["conv", "full_attention", "conv"], "num_hidden_layers": 3})


def _granitemoehybrid(config) -> dict:
    # The default config is all Mamba (and on 4.57 leaves layer_types None, which its model cannot
    # build from); released Granite-4.0-H models interleave Mamba-2 and attention layers.
    names = ("mamba", "attention") if config.layer_types is None else ("linear_attention", "full_attention")
    return {"layer_types": list(names), "num_hidden_layers": 2}


register_twin_overrides(("granitemoehybrid",), _granitemoehybrid)

# The default config has indexed-attention (QSA) layers but leaves the indexer's sizes None, so no
# model builds from it; real checkpoints set them. Small ones, with a token budget and compressed
# blocks that the test lengths cross (the indexer needs one key head).
register_twin_overrides(
    ("qwen4_exp_text",),
    {
        "indexer_n_heads": 4,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 16,
        "indexer_budget": WINDOW,
        "indexer_compress_ratio": 4,
    },
)

# Dory serialises each layer as an (attention, mlp) pair and splits the stack into input,
# recurrent (looped) and output layers, which generic layer selection cannot keep together: one
# sliding layer in, a sliding and a full layer looped, one full layer out.
register_twin_overrides(
    ("dory",),
    {
        "layer_types": ["sliding_attention", "mlp", "sliding_attention", "mlp", "full_attention", "mlp"]
        + ["full_attention", "mlp"],
        "num_hidden_layers": 8,
        "n_input_layers": 2,
        "n_recurrent_layers": 4,
        "n_output_layers": 2,
    },
)

# The default config is all full attention with no RoPE parameters for it, so no model builds from
# it. Released North models interleave sliding layers with interleaved M-RoPE (theta 50000,
# sections [24, 20, 20] of a 128 head dim) and full NoPE layers; the twin has them at head dim 16.
register_twin_overrides(
    ("cohere_compass_text",),
    {
        "layer_types": ["sliding_attention", "full_attention"],
        "num_hidden_layers": 2,
        "rope_parameters": {
            "sliding_attention": {
                "rope_type": "default",
                "rope_theta": 50000.0,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
            "full_attention": None,
        },
    },
)

# ReformerModelWithLMHead, the causal LM, asserts is_decoder=True (the default config says False).
register_twin_overrides(("reformer",), {"is_decoder": True})

# X-MOD picks a language adapter per input; without lang_ids its model needs a default language,
# which the default config leaves None: the twin uses its first (only) language.
register_twin_overrides(("xmod",), lambda config: {"default_language": config.languages[0]})


def _git(config) -> dict:
    raise TwinError(
        "git is not a text causal LM: GitForCausalLM's loss always skips the image tokens "
        "((image_size / patch_size)^2 + 1), so it cannot score text-only input"
    )


register_twin_overrides(("git",), _git)
