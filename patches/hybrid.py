"""Hybrid and recurrent causal LMs: Mamba/Mamba2 mixers, short convolutions, gated delta rules.

Their attention layers (if any) take the generic route; their recurrent layers compute through
module-level functions of the modeling file (transformers 5.x), which the engine routes through
boundary-aware ops (``hf_varlen_patch.recurrent``): the convolution drops taps of the previous
sequence and every scan starts a fresh state at each sequence start. Upstream derives nothing from
position_ids for these layers, so unpatched they leak state across packed sequences. From
transformers 5.25 those functions are ``kernels`` function modules a hub kernel can replace; a
packed forward through a mixer whose routed call a hub kernel would bypass raises instead
(``guard_recurrent_layers``).

Mixers computed inline, with no function to route, run with each packed sequence as its own row
(``AS_ROWS``); Griffin's RG-LRU, which resets at position 0, gets positions restarting per sequence.
On transformers 4.57 only ``ROUTED_ON_4`` are patched: the other mixers compute inline in
``torch_forward`` (nothing to route without copying the layer). ``INLINE`` lists the refusals.
"""

from __future__ import annotations

import importlib
import sys
import types

import torch
import transformers

from hf_varlen_patch.context import boundaries_for
from hf_varlen_patch.patching import accepts_var_kwargs
from hf_varlen_patch.recurrent import (
    blocks_enter_their_boundaries,
    guard_recurrent_layers,
    route_causal_conv,
    route_recurrent_attribute,
    route_recurrent_functions,
    routed_functions,
    run_sequences_as_rows,
)
from hf_varlen_patch.registry import PatchEntry, ReleaseRefusal, register
from hf_varlen_patch.sequence_parallel import on_whole_stream
from hf_varlen_patch.versions import TRANSFORMERS_4

#: model_type -> the modeling module that holds its recurrent functions (default: its own).
MODELING = {
    "qwen3_5_text": "qwen3_5",
    "qwen3_5_moe_text": "qwen3_5_moe",
}

HYBRIDS = (
    "bamba",
    "falcon_h1",
    "falcon_mamba",
    "granitemoehybrid",
    "jamba",
    "kimi_linear",
    "bailing_hybrid",
    "lara_mini",
    "lfm2",
    "lfm2_moe",
    "lfm3",
    "mamba",
    "mamba2",
    "nemotron_h",
    "olmo_hybrid",
    "qwen3_5_text",
    "qwen3_5_moe_text",
    "qwen3_next",
    "minimax",
    "recurrent_gemma",
    "zamba",
    "zamba2",
    "zaya",
)

#: What upstream computes inline (a token loop, a scan or position terms in the layer's forward),
#: with no function to route: refused until they get a dedicated patch.
INLINE = {
    "xlstm": "its model runs long rows in chunks with a cache between them (and crashes upstream with its "
    "default cache in train mode), so its mLSTM layers cannot run each sequence as its own row",
    "inkling_text": "its relative position bias and log-scaled queries are computed from the whole row's "
    "positions (an arange over the row) and reach only the eager attention path",
    "inkling2_text": "its relative position bias is computed from the whole row's positions and added to the "
    "attention scores, which the varlen backends do not take",
    "inkling2_loop_text": "its relative position bias is computed from the whole row's positions and added to "
    "the attention scores, which the varlen backends do not take",
    "qwen4_exp_text": "its QSA indexer picks key blocks from the dense attention mask and its n-gram embedding "
    "reads the previous token ids of the whole row",
}


# Bamba's default config has no attention layer (attn_layer_indices None); released Bamba models
# interleave attention with Mamba-2 layers, and a cache over Mamba layers only breaks upstream's
# mask creation.
TWINS = {
    "bamba": {"attn_layer_indices": [1], "num_hidden_layers": 2},
    # RecurrentGemma repeats (recurrent, recurrent, attention) blocks: two layers would drop attention.
    "recurrent_gemma": {"num_hidden_layers": 3},
}


def _modeling(model_type: str) -> types.ModuleType | None:
    name = MODELING.get(model_type, model_type).replace("-", "_")
    try:
        return importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except ImportError:
        return None


#: Types patched on transformers 4.x too: qwen3_next and lfm2 keep their kernels as instance
#: attributes and convolve with an ``nn.Conv1d`` (both routed per instance); minimax and rwkv
#: run their mixers with each sequence as its own row (``AS_ROWS``): nothing to route.
ROUTED_ON_4 = ("qwen3_next", "lfm2", "minimax", "rwkv")
#: Mixers computed inline (no function to route), run with each packed sequence as its own row:
#: type -> {class name without the family prefix: (per-token outputs, {output: argument handed
#: back})}. MiniMax's block-wise lightning attention; Zaya's CCA projection (two stacked causal
#: convolutions and a one-token-delayed value); RWKV's token shift and WKV recurrence.
AS_ROWS = {
    "minimax": {"LightningAttention": ((0,), {})},
    "zaya": {"CCAProjection": ((0, 1, 2), {})},
    "rwkv": {"SelfAttention": ((0,), {1: "state"}), "FeedForward": ((0,), {1: "state"})},
}
#: Types that convolve with an ``nn.Conv1d`` module on every line (routed per instance).
CONV_MODULES = ("recurrent_gemma",)
#: Recurrences that reset where ``position_ids == 0`` (Griffin's RG-LRU): in packed forwards they get
#: positions that restart at every sequence start, also where the caller's do not start at 0.
RESET_AT_POSITION_ZERO = ("Rglru",)
#: The kernels a 4.x mixer binds as attributes -> the op that takes their place in packed forwards.
ATTRIBUTES_ON_4 = {"chunk_gated_delta_rule": "torch_chunk_gated_delta_rule", "causal_conv1d_fn": "causal_conv1d_fn"}


#: On 4.57 the other types' recurrent layers compute inline (nothing to route without copying them).
REFUSED_ON_4 = (
    ReleaseRefusal(
        tuple(t for t in HYBRIDS if t not in ROUTED_ON_4),
        "its recurrent layers compute inline in their forward, which hf_varlen_patch does not copy",
        fix="upgrade to transformers 5.x, where their convolution and scans are routed through boundary-aware ops",
    ),
)


def _refuse(config) -> str | None:
    model_type = config.model_type
    if model_type in INLINE:
        return f"{INLINE[model_type]}; hf_varlen_patch has no boundary-aware version of it yet."
    if TRANSFORMERS_4:
        return None  # ROUTED_ON_4; the others are refused on 4.57 (REFUSED_ON_4)
    module = _modeling(model_type)
    if model_type in CONV_MODULES or model_type in AS_ROWS or (module is not None and routed_functions(module)):
        return None
    return (
        f"transformers {transformers.__version__} computes {model_type}'s recurrent layers without the "
        "module-level functions hf_varlen_patch routes (causal_conv1d_fn, mamba2_chunk_scan, ...)."
    )


def _prefix(model) -> str:
    """The class-name prefix of ``model``'s family (``MiniMax`` for ``MiniMaxForCausalLM``)."""
    return type(model.base_model).__name__.removesuffix("Model")


def _restart_positions(patcher, layer) -> None:
    """``layer(activations, position_ids)`` resets its state where a position is 0."""

    def forward(wrapped, instance, args, kwargs):
        boundaries = boundaries_for()
        if boundaries is None or len(args) != 2:
            return wrapped(*args, **kwargs)
        shard = getattr(boundaries, "shard", None)
        if shard is not None:  # sequence parallel: the recurrence runs on the whole stream
            return on_whole_stream(
                lambda whole, call: wrapped(call["x"], whole.position_ids().to(args[1].device), **kwargs),
                shard,
                {"x": args[0]},
                {"x": 1},
                1,
            )
        return wrapped(args[0], boundaries.position_ids().to(args[1].device), **kwargs)

    patcher.wrap_method(layer, "forward", forward)


def _patch(model, patcher, options) -> None:
    modules = {sys.modules[type(m).__module__] for m in model.modules()}
    for module in sorted(modules, key=lambda m: m.__name__):
        if module.__name__.startswith("transformers.models."):
            route_recurrent_functions(patcher, module)
    for layer in model.modules():
        if TRANSFORMERS_4:
            for attr, op in ATTRIBUTES_ON_4.items():
                if callable(vars(layer).get(attr)):
                    route_recurrent_attribute(patcher, layer, attr, op)
        if isinstance(layer, torch.nn.Conv1d) and (TRANSFORMERS_4 or model.config.model_type in CONV_MODULES):
            route_causal_conv(patcher, layer)
        if type(layer).__name__.endswith(RESET_AT_POSITION_ZERO):
            _restart_positions(patcher, layer)
        rows = AS_ROWS.get(model.config.model_type, {}).get(type(layer).__name__.removeprefix(_prefix(model)))
        if rows is not None:
            run_sequences_as_rows(patcher, layer, scatter=rows[0], passthrough=rows[1])
    guard_recurrent_layers(patcher, model)
    blocks_enter_their_boundaries(patcher, model)  # blocks compiled alone: no graph break at the routers


#: No attention layer: the boundaries reach the mixers through the forward's context, and the
#: mixers get no attention mask (padding is a sequence of its own, so it cannot leak either).
ATTENTION_FREE = ("mamba", "mamba2", "falcon_mamba", "rwkv")


def _from_context(model) -> bool:
    return model.config.model_type in ATTENTION_FREE or not accepts_var_kwargs(model.base_model.forward)


register(
    PatchEntry(
        family="hybrid",
        model_types=HYBRIDS + tuple(INLINE),
        patch=_patch,
        refuse=_refuse,
        boundaries_from_context=_from_context,
        refused_on=REFUSED_ON_4,
        twin_overrides=TWINS,
        notes=(
            "attention via AttentionInterface; conv taps and SSM/delta-rule state reset at each start "
            "(5.x; 4.57: qwen3_next, lfm2); inline recurrences refused"
        ),
    )
)


#: RWKV: fp32 rounding of its large gradients (about 1e2 on the twin) alone reaches 2e-5, above the
#: 1e-5 tolerance; packed == separate holds to float64 rounding.
register(
    PatchEntry(
        family="hybrid",
        model_types=("rwkv",),
        patch=_patch,
        refuse=_refuse,
        boundaries_from_context=_from_context,
        test_dtype=torch.float64,
        notes="token shift and WKV recurrence run with each sequence as its own row; tested in float64",
    )
)
