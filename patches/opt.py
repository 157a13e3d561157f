"""OPT: learned absolute positions (offset 2) and AttentionInterface attention.

Positions: upstream derives them from the attention mask's cumsum only when ``position_ids`` is
None; the patched forward always passes the restarting ``position_ids``, which upstream then
uses directly (``position_ids + 2``) on both transformers lines. Attention takes the generic route.

``OPTForCausalLM.forward`` calls ``self.model.decoder`` and so skips the base model's (the
``OPTModel``'s) forward, where the engine would swap the padding mask for its zero-memory
placeholder; the decoder's forward is wrapped on this instance like a base model's, so no
(T, T) mask is built for packed batches either.
"""

from __future__ import annotations

from hf_varlen_patch.patching import accepts_var_kwargs, make_entry_wrapper
from hf_varlen_patch.registry import PatchEntry, register

from ._common import tiny_config


def _configs(model_type: str) -> dict:
    # 1024 positions: padding positions of the property tests ("continue") reach past 512.
    return {
        "default": tiny_config(
            "opt", ffn_dim=96, word_embed_proj_dim=64, dropout=0.0, layerdrop=0.0, max_position_embeddings=1024
        )
    }


def _patch(model, patcher, options) -> None:
    decoder = getattr(model.base_model, "decoder", None)
    if decoder is None or decoder is model.base_model:
        return
    wrapper = make_entry_wrapper(
        check_inputs=options.check_inputs,
        is_base=True,
        is_top=False,
        passes_kwargs=accepts_var_kwargs(decoder.forward),
    )
    patcher.wrap_method(decoder, "forward", wrapper)


register(
    PatchEntry(
        family="opt",
        model_types=("opt",),
        test_configs=_configs,
        patch=_patch,
        notes="learned positions (offset 2) from position_ids; attention via AttentionInterface",
    )
)
