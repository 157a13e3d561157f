"""Tiny twins: shrink any causal-LM config to CPU-test size, keeping what changes the maths.

A twin has the same config class, hence the same model classes, as the original; only sizes
change (widths, heads, layers, experts, vocabulary, windows). Every flag that changes attention
or positions survives: layer types, sliding windows (shrunk below the test lengths so they bite),
softcaps, sinks, rope type and partial rotary, MLA ranks, MoE routing, q/k norms, ALiBi, parallel
residuals, multipliers. Dropouts and router jitter are switched off (they would make two runs
differ for reasons other than packing). A value that counts tokens under a key the shrink does not
know stays as it is: :func:`length_values` finds every such value by its key's name, anywhere in
the config, so the self-check can run sequences that cross it (or refuse).

Families whose config cannot be shrunk generically declare overrides in their registry entry
(``PatchEntry.twin_overrides``; without an entry, ``registry.register_twin_overrides`` in
``patches/twin_overrides.py``); the twin applies them last, also to a composite config's
sub-config of that family.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "tiny_config",
    "twin_overrides",
    "TwinError",
    "config_fingerprint",
    "dropped_flags",
    "length_values",
    "position_capacity",
]

#: Target sizes of a twin.
HIDDEN = 64
HEADS = 4
HEAD_DIM = 16
LAYERS = 2
VOCAB = 128
EXPERTS = 8
TOP_K = 2
WINDOW = 8  # shorter than the test sequences, so windows and chunks are exercised
MAX_POSITIONS = 1024

#: Widths that follow the hidden size (scaled by their ratio to it).
HIDDEN_KEYS = (
    "hidden_size",
    "d_model",
    "n_embd",
    "dim",
    "emb_dim",
    "embed_dim",
    "model_dim",
    "embedding_dim",
    "d_embed",
)
#: Widths that must equal another (sub-)model's hidden size: they become the twin's hidden size.
LINKED_HIDDEN_KEYS = ("hidden_size_global", "adapter_out_dim")
WIDTH_KEYS = (
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "shared_intermediate_size",
    "shared_experts_intermediate_size",
    "moe_shared_expert_intermediate_size",
    "dense_intermediate_size",
    "intermediate_size_mlp",
    "expert_ffn_hidden_size",
    "ffn_hidden_size",
    "decoder_ffn_dim",
    "encoder_ffn_dim",
    "ffn_dim",
    "n_inner",
    "d_ff",
    "dim_ff",
    "dff",
    "d_inner",
    "feed_forward_size",
    "kv_lora_rank",
    "q_lora_rank",
    "o_lora_rank",
    "embedding_size",
    "word_embed_proj_dim",
    "hidden_size_per_layer_input",
    "backbone_hidden_size",
    "attention_hidden_size",
    "router_hidden_size",
    "laurel_rank",
    "gated_norm_rank",
    "loop_gate_rank",
    "input_embedding_size",
    "output_embedding_size",
    "lru_width",
    "pronunciation_embed_dim",
    "shape_embed_dim",
    "ple_embed_dim",
    "adapter_in_dim",
    "adapter_input_size",
    "mamba_d_ssm",
)
#: Per-head widths (scaled by their ratio to the original head dim).
HEAD_DIM_KEYS = (
    "head_dim",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "qk_head_dim",
    "v_head_dim",
    "index_head_dim",
    "swa_head_dim",
    "kv_channels",
    "d_head",
    "dim_head",
    "attention_head_dim",
    "attention_head_size",
    "linear_key_head_dim",
    "linear_value_head_dim",
    "linear_head_dim",
    "mamba_d_head",
    "mamba_head_dim",
    "mamba_headdim",
    "rotary_dim",
)
HEAD_KEYS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads", "attention_heads")
KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "num_query_groups", "n_kv_heads")
SECONDARY_HEAD_KEYS = (
    "swa_num_attention_heads",
    "swa_num_key_value_heads",
    "index_n_heads",
    "linear_num_key_heads",
    "linear_num_value_heads",
    "linear_num_heads",
    "mamba_n_heads",
    "mamba_num_heads",
    "n_mamba_heads",
    "encoder_attention_heads",
)
LAYER_KEYS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers", "depth")
VOCAB_KEYS = ("vocab_size",)
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token", "top_k")
WINDOW_KEYS = (
    "sliding_window",
    "sliding_window_size",
    "attention_window_size",
    "local_attention_window_len",
    "attention_chunk_size",
    "window_size",
    "local_attention",
    "index_topk",
)
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "max_target_positions")
ZERO_KEYS = ("router_jitter_noise", "input_jitter_noise", "layerdrop", "decoder_layerdrop", "encoder_layerdrop")

#: Keys that a twin changes on purpose (sizes); any other difference is a dropped flag.
SIZE_KEYS = frozenset(
    HIDDEN_KEYS
    + LINKED_HIDDEN_KEYS
    + WIDTH_KEYS
    + HEAD_DIM_KEYS
    + HEAD_KEYS
    + KV_HEAD_KEYS
    + SECONDARY_HEAD_KEYS
    + LAYER_KEYS
    + VOCAB_KEYS
    + EXPERT_KEYS
    + TOP_K_KEYS
    + WINDOW_KEYS
    + POSITION_KEYS
    + ZERO_KEYS
    + (
        "layer_types",
        "n_group",
        "num_expert_group",
        "topk_group",
        "first_k_dense_replace",
        "n_shared_experts",
        "num_shared_experts",
        "moe_num_shared_experts",
        "num_nextn_predict_layers",
        "mlp_only_layers",
        "max_window_layers",
        "num_dense_layers",
        "num_kv_shared_layers",
        "n_groups",
        "mamba_n_groups",
        "mamba_ngroups",
        "cutoffs",
        "use_mamba_kernels",
        "initializer_range",
        "_attn_implementation_autoset",
        "transformers_version",
    )
)


class TwinError(ValueError):
    """A config that cannot be shrunk to a twin (the message says why)."""


#: Where declared overrides come from: the registry hands its lookup in on import, so this module
#: (used by the registry for default test configs) imports nothing back.
_DECLARED: list[Callable[[str], Callable[[Any], dict[str, Any]] | None]] = []


def declare_overrides_with(lookup: Callable[[str], Callable[[Any], dict[str, Any]] | None]) -> None:
    """Take per-type twin overrides from ``lookup(model_type)`` (the registry's)."""
    _DECLARED[:] = [lookup]


def twin_overrides(model_type: str) -> Callable[[Any], dict[str, Any]] | None:
    """``original_config -> values`` that a registry declaration sets for ``model_type``'s twin."""
    return _DECLARED[0](model_type) if _DECLARED else None


def _even(x: float, minimum: int = 2) -> int:
    return max(minimum, 2 * round(x / 2))


def _multiple_of_8(x: float) -> int:
    return max(8, 8 * math.ceil(x / 8))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _first(d: dict, keys: Iterable[str]) -> tuple[str | None, Any]:
    for k in keys:
        if _is_int(d.get(k)):
            return k, d[k]
    return None, None


#: Layer patterns given by a formula over the layer index: a twin keeps a prefix that holds one
#: full period (plus offset), since selected layers would change their index.
PERIOD_KEYS = (
    "decoder_sparse_step",
    "interleave_moe_layer_step",
    "moe_layer_interval",
    "expert_layer_period",
    "attn_layer_period",
    "sliding_window_pattern",
    "_sliding_window_pattern",
    "no_rope_layer_interval",
    "global_attn_every_n_layers",
)
OFFSET_KEYS = ("expert_layer_offset", "attn_layer_offset", "moe_layer_start_index")
#: Counts of layers at the end of the stack that differ from the rest (e.g. layers that reuse an
#: earlier layer's keys and values): a twin keeps some of them, and the count follows.
TAIL_KEYS = ("num_kv_shared_layers",)


def _tails(d: dict, layers: int) -> list[str]:
    return [k for k in TAIL_KEYS if _is_int(d.get(k)) and 0 < d[k] < layers]


def _per_layer_lists(d: dict, layers: int) -> list[str]:
    return [k for k, v in d.items() if isinstance(v, list) and len(v) == layers and layers > 1]


#: Dicts keyed by small integers that are not per-layer settings.
NOT_PER_LAYER = ("id2label", "label2id")


def _per_layer_dicts(d: dict, layers: int) -> list[str]:
    out = []
    for k, v in d.items():
        if k in NOT_PER_LAYER:
            continue
        if isinstance(v, dict) and v and all(str(i).isdigit() and int(i) < layers for i in v):
            out.append(k)
    return out


def _layer_id_lists(d: dict, layers: int, skip: list[str]) -> list[str]:
    out = []
    for k, v in d.items():
        if k in skip or ("layer" not in k and "idx" not in k) or not isinstance(v, list) or not v:
            continue
        if all(_is_int(i) and 0 <= i < layers for i in v) and v == sorted(set(v)):
            out.append(k)
    return out


def _kept_layers(d: dict, layers: int) -> list[int]:
    """Original indices of the layers a twin keeps: the first of each distinct kind, at least
    ``LAYERS``; a contiguous prefix when a formula over the index decides the kind."""
    lists = _per_layer_lists(d, layers)
    dicts = _per_layer_dicts(d, layers)
    ids = _layer_id_lists(d, layers, lists)
    dense = max((d[k] for k in ("first_k_dense_replace", "num_dense_layers") if _is_int(d.get(k))), default=0)
    tails = _tails(d, layers)

    def kind(i: int) -> tuple:
        return (
            tuple(str(d[k][i]) for k in lists),
            tuple(str(d[k].get(str(i), d[k].get(f"{i:02d}", d[k].get(i)))) for k in dicts),
            tuple(i in d[k] for k in ids),
            i < dense,
            tuple(i >= layers - d[k] for k in tails),
        )

    kept, seen = [], set()
    for i in range(layers):
        if kind(i) not in seen:
            seen.add(kind(i))
            kept.append(i)
    for i in range(layers):
        if len(kept) >= LAYERS:
            break
        if i not in kept:
            kept.append(i)
    kept.sort()
    period = max((d[k] for k in PERIOD_KEYS if _is_int(d.get(k))), default=0)
    offset = max((d[k] for k in OFFSET_KEYS if _is_int(d.get(k))), default=0)
    if period > 1:
        prefix = max(period + offset, kept[-1] + 1)
        kept = list(range(min(layers, prefix)))
    return kept


def _kept_tail(d: dict, layers: int, kept: list[int], key: str) -> int:
    return sum(1 for i in kept if i >= layers - d[key])


def _select_layers(d: dict, out: dict, layers: int, kept: list[int], scale: _Scale) -> None:
    """Rewrite every per-layer list, dict and index list of ``d`` into ``out`` for ``kept``."""
    lists = _per_layer_lists(d, layers)
    for k in lists:
        values = [out[k][i] if isinstance(out.get(k), list) and len(out[k]) == layers else d[k][i] for i in kept]
        out[k] = values
    for k in _per_layer_dicts(d, layers):
        remapped = {}
        for new, old in enumerate(kept):
            for key in (str(old), f"{old:02d}", old):
                if key in d[k]:
                    width = len(key) if isinstance(key, str) else 0
                    name = f"{new:0{width}d}" if width else new
                    value = d[k][key]
                    remapped[name] = _shrink_dict(value, top=False, context=scale) if isinstance(value, dict) else value
                    break
        out[k] = remapped
    for k in _layer_id_lists(d, layers, lists):
        out[k] = [new for new, old in enumerate(kept) if old in d[k]]


@dataclass(frozen=True)
class _Scale:
    """The original sizes that proportional rules scale from."""

    hidden: int | None
    heads: int | None
    head_dim: int | None

    @classmethod
    def of(cls, d: dict, parent: _Scale | None = None) -> _Scale:
        _, hidden = _first(d, HIDDEN_KEYS)
        _, heads = _first(d, HEAD_KEYS)
        head_dim = d.get("head_dim") if _is_int(d.get("head_dim")) else None
        hidden = hidden or (parent.hidden if parent else None)
        heads = heads or (parent.heads if parent else None)
        if head_dim is None and parent and parent.head_dim:
            head_dim = parent.head_dim
        elif head_dim is None and hidden and heads:
            head_dim = hidden // heads
        return cls(hidden, heads, head_dim)


def _shrink_value(key: str, value: Any, scale: _Scale) -> Any:
    """The twin's value for one size key (lists element-wise); other keys come back unchanged."""
    if isinstance(value, list):
        return [_shrink_value(key, v, scale) for v in value]
    if isinstance(value, float) and ("dropout" in key or "pdrop" in key or key in ZERO_KEYS):
        return 0.0
    if not _is_int(value):
        return value
    if key in ZERO_KEYS:
        return 0
    if key in HIDDEN_KEYS or key in LINKED_HIDDEN_KEYS:
        return HIDDEN if value > HIDDEN else value
    if key in WIDTH_KEYS and scale.hidden and scale.hidden > HIDDEN and value > 8:
        return _multiple_of_8(value * HIDDEN / scale.hidden)
    if key in HEAD_KEYS or "num_attention_heads" in key:
        return HEADS if value > HEADS else value
    if key in KV_HEAD_KEYS or "key_value_heads" in key:
        if value <= 0 or not scale.heads or scale.heads <= HEADS:
            return value
        return HEADS if value >= scale.heads else (1 if value == 1 else 2)
    if key in SECONDARY_HEAD_KEYS:
        return value if value <= HEADS else (HEADS if scale.heads and value >= scale.heads else 2)
    if key in HEAD_DIM_KEYS and scale.head_dim and scale.head_dim > HEAD_DIM and value > 4:
        return _even(value * HEAD_DIM / scale.head_dim, 4)
    if key in EXPERT_KEYS:
        return min(value, EXPERTS)
    if key in TOP_K_KEYS:
        return min(value, TOP_K)
    if key in ("n_group", "num_expert_group"):
        return min(value, 2)
    if key == "topk_group":
        return min(value, 1)
    if key in ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts") and value > 2:
        return 1
    if key == "num_nextn_predict_layers":
        return min(value, 1)
    if key in VOCAB_KEYS or "vocab" in key or key == "zero_expert_num":
        return min(value, VOCAB if "vocab" in key else EXPERTS)
    if key in WINDOW_KEYS:
        return min(value, WINDOW)
    if key in POSITION_KEYS:
        return min(value, MAX_POSITIONS)
    return value


def _fill_missing(d: dict, out: dict) -> None:
    """Values a default config leaves None that its model cannot run without (real checkpoints set
    them): an MoE top-k, the expert count, the key/value heads, the head dim."""
    has_experts = any(k in d for k in EXPERT_KEYS)
    if has_experts and any(k in d and d[k] is None for k in TOP_K_KEYS):
        for k in TOP_K_KEYS:
            if k in d and d[k] is None:
                out[k] = TOP_K
        for k in EXPERT_KEYS:
            if k in d and d[k] is None:
                out[k] = EXPERTS
        for k in ("n_shared_experts", "num_shared_experts"):
            if k in d and d[k] is None:
                out[k] = 1
    heads = next((out[k] for k in HEAD_KEYS if _is_int(out.get(k))), None)
    for k in KV_HEAD_KEYS[:1]:
        if k in d and d[k] is None and heads:
            out[k] = heads
    hidden = next((out[k] for k in HIDDEN_KEYS if _is_int(out.get(k))), None)
    if "head_dim" in d and d["head_dim"] is None and hidden and heads:
        out["head_dim"] = hidden // heads


#: (expand, heads, head dim, groups, explicit inner width) of SSM (Mamba-2) mixers: the inner width
#: (``expand * hidden`` unless given) is ``heads * head_dim``, and the groups of B/C divide the heads.
SSM_KEYS = (
    ("mamba_expand", "mamba_n_heads", "mamba_d_head", "mamba_n_groups", "mamba_d_ssm"),
    ("mamba_expand", "mamba_num_heads", "mamba_head_dim", "n_groups", None),
    ("mamba_expand", "n_mamba_heads", "mamba_headdim", "mamba_ngroups", None),
    ("expand", "mamba_num_heads", "mamba_head_dim", "n_groups", None),
    ("expand", "num_heads", "head_dim", "n_groups", None),
)


def _keep_ssm_consistent(d: dict, out: dict) -> None:
    hidden = next((out[k] for k in HIDDEN_KEYS if _is_int(out.get(k))), None)
    for expand, heads, head_dim, groups, width_key in SSM_KEYS:
        if not (_is_int(out.get(heads)) and head_dim in out):
            continue
        if expand == "expand" and heads == "num_heads" and "state_size" not in d:
            continue  # an attention config's num_heads/head_dim
        new_heads = out[heads]
        if width_key and _is_int(d.get(width_key)):
            # an explicit inner width: keep the head dim small and the width its multiple
            old = d[head_dim] if _is_int(d.get(head_dim)) else HEAD_DIM
            out[head_dim] = min(old, HEAD_DIM)
            out[width_key] = new_heads * out[head_dim]
        elif isinstance(out.get(expand), (int, float)) and not isinstance(out.get(expand), bool) and hidden:
            width = int(out[expand] * hidden)
            if new_heads and width % new_heads == 0:
                out[head_dim] = width // new_heads
        if _is_int(d.get(groups)) and _is_int(d.get(heads)):
            old_groups, old_heads = d[groups], d[heads]
            if old_groups >= old_heads:
                out[groups] = new_heads
            elif old_groups > 1:
                out[groups] = 2 if new_heads % 2 == 0 and new_heads > 2 else 1


def _shrink_dict(d: dict, *, top: bool, context: _Scale | None = None) -> dict:
    """Shrink one config dict (sub-configs recursively); ``top``: the causal LM's own config."""
    scale = _Scale.of(d, context)
    out = {k: _shrink_value(k, v, scale) for k, v in d.items()}
    for k, v in d.items():
        if isinstance(v, dict) and ("model_type" in v or k.endswith("_config")):
            out[k] = _shrink_dict(v, top=False)
    _fill_missing(d, out)
    new_hidden = next((out[k] for k in HIDDEN_KEYS if _is_int(out.get(k))), None)
    new_heads = next((out[k] for k in HEAD_KEYS if _is_int(out.get(k))), None)
    if new_hidden and new_heads and "head_dim" not in d and new_hidden % new_heads:
        raise TwinError(f"hidden size {new_hidden} is not divisible by {new_heads} heads")

    # ---- layers: one of each kind of layer (by every per-layer list, dict and formula)
    _, layers = _first(d, LAYER_KEYS)
    if layers:
        kept = _kept_layers(d, layers)
        if len(kept) < layers:
            for k in LAYER_KEYS:
                if _is_int(d.get(k)) and d[k] == layers:
                    out[k] = len(kept)
                elif _is_int(d.get(k)) and 0 < d[k] < layers and layers % d[k] == 0:
                    # blocks of several sub-layers (longcat_flash: num_layers = num_hidden_layers / 2)
                    out[k] = max(1, len(kept) * d[k] // layers)
            _select_layers(d, out, layers, kept, scale)
            for k in _tails(d, layers):
                out[k] = _kept_tail(d, layers, kept, k)
        for k in ("first_k_dense_replace", "num_dense_layers"):
            if _is_int(d.get(k)) and d[k] > 1:
                out[k] = 1
        if _is_int(d.get("max_window_layers")) and d["max_window_layers"] >= len(kept):
            out["max_window_layers"] = max(1, len(kept) // 2)

    # ---- token ids must index the shrunk vocabulary (a composite config's: its text model's)
    vocab = out.get("vocab_size")
    if vocab is None and isinstance(out.get("text_config"), dict):
        vocab = out["text_config"].get("vocab_size")
    if _is_int(vocab):
        taken: set[int] = set()
        for k, v in d.items():
            if not (k.endswith("token_id") or k.endswith("token_index")):
                continue
            if _is_int(v) and v >= vocab:
                out[k] = vocab - 1 - len(taken)
                taken.add(out[k])
            elif isinstance(v, list) and any(_is_int(x) and x >= vocab for x in v):
                out[k] = [x if not _is_int(x) or x < vocab else vocab - 1 for x in v]
    # int lists that split the width (e.g. axial position embedding dims) keep adding up to it
    if new_hidden and scale.hidden and scale.hidden > new_hidden:
        for k, v in d.items():
            if "dim" in k and isinstance(v, (list, tuple)) and len(v) > 1 and all(_is_int(x) and x > 0 for x in v):
                if sum(v) == scale.hidden:
                    out[k] = type(v)(_scale_sections(list(v), new_hidden))
    # adaptive-softmax cutoffs must stay increasing and inside the shrunk vocabulary
    if _is_int(vocab) and _is_int(d.get("vocab_size")) and isinstance(d.get("cutoffs"), list):
        cut, prev = [], 0
        for c in d["cutoffs"]:
            prev = max(prev + 1, c * vocab // d["vocab_size"]) if _is_int(c) else c
            cut.append(prev)
        out["cutoffs"] = cut
    # Mamba layers need the CUDA kernels when this is on; the torch path computes the same maths
    if d.get("use_mamba_kernels") is True and not _mamba_kernels_available():
        out["use_mamba_kernels"] = False
    _keep_ssm_consistent(d, out)
    # rope sections (mRoPE) must still add up to half the head dim
    head_dim = out.get("head_dim") if _is_int(out.get("head_dim")) else None
    if head_dim is None and new_hidden and new_heads:
        head_dim = new_hidden // new_heads
    for rkey in ("rope_parameters", "rope_scaling"):
        rope = out.get(rkey)
        if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list) and head_dim:
            out[rkey] = {**rope, "mrope_section": _scale_sections(rope["mrope_section"], head_dim // 2)}
    return out


def _mamba_kernels_available() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and all(
        importlib.util.find_spec(m) is not None for m in ("mamba_ssm", "causal_conv1d")
    )


def _scale_sections(sections: list[int], total: int) -> list[int]:
    old = sum(sections)
    scaled = [max(1, s * total // old) for s in sections]
    scaled[0] += total - sum(scaled)
    return scaled


def _base_config(model_type_or_config: Any) -> Any:
    from transformers import CONFIG_MAPPING, PretrainedConfig

    if isinstance(model_type_or_config, PretrainedConfig):
        return model_type_or_config
    if not isinstance(model_type_or_config, str):
        raise TypeError(f"tiny_config takes a model_type or a config, not {type(model_type_or_config).__name__}")
    if model_type_or_config not in CONFIG_MAPPING:
        raise TwinError(f"transformers has no config for model_type {model_type_or_config!r}")
    try:
        return CONFIG_MAPPING[model_type_or_config]()
    except Exception as err:  # transformers' own default does not validate
        reason = f"{type(err).__name__}: {err}"
        raise TwinError(f"the default {model_type_or_config} config does not build: {reason}") from err


def _merge(shrunk: dict, overrides: dict) -> dict:
    """``shrunk`` updated with ``overrides``; a dict for a sub-config updates that sub-config."""
    out = dict(shrunk)
    for key, value in overrides.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict) and "model_type" in old:
            out[key] = {**old, **value}
        else:
            out[key] = value
    return out


#: Arguments of a causal LM's forward that only a target model can supply (draft/assistant models).
TARGET_ONLY_ARGS = ("shared_kv_states",)


def _check_standalone(model_type: str, config_cls: type | None = None) -> None:
    """Raise :class:`TwinError` when AutoModelForCausalLM cannot build or run ``model_type`` on its own."""
    import inspect

    from transformers import CONFIG_MAPPING
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    if model_type not in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or model_type not in CONFIG_MAPPING:
        return
    if model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return  # a vision-language model: its twin is built whole (AutoModelForImageTextToText)
    config_cls = config_cls or CONFIG_MAPPING[model_type]
    try:
        model_cls = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING[config_cls]
    except Exception:  # not mapped, or the model needs a library that is missing
        return
    params = inspect.signature(model_cls.forward).parameters
    needs = [name for name in TARGET_ONLY_ARGS if name in params]
    if needs:
        raise TwinError(
            f"{model_type} is not a standalone causal LM: {model_cls.__name__}.forward needs {', '.join(needs)} "
            "from its target model"
        )
    takes = getattr(model_cls, "config_class", None)
    if not isinstance(takes, type) or issubclass(config_cls, takes):
        return
    subs = getattr(config_cls, "sub_configs", None) or {}
    sub = next((key for key, value in subs.items() if value is takes), None)
    if sub is None:
        return  # a model class shared with another family (duck-typed configs build fine)
    if sub == "text_config" and "text_config" in inspect.getsource(_BaseAutoModelClass.from_config):
        return  # from_config builds the model on the text sub-config
    raise TwinError(
        f"AutoModelForCausalLM maps {model_type} to {model_cls.__name__}, which takes the {sub} sub-config "
        f"({takes.__name__}), not {config_cls.__name__}: it cannot be built from this config"
    )


def _init_only_windows(cls: type, shrunk: dict) -> dict[str, int]:
    """Windows a config class takes at init but does not store, deriving a stored one from them
    (4.57's ModernBERT-decoder: ``sliding_window = local_attention // 2``): passed shrunk, or the
    stored window would come back at full size."""
    import inspect

    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return {}
    return {
        key: WINDOW
        for key in WINDOW_KEYS
        if key not in shrunk and key in params and _is_int(params[key].default) and params[key].default > WINDOW
    }


def tiny_config(model_type_or_config: Any, **overrides: Any) -> Any:
    """A tiny twin of ``model_type_or_config`` (a model_type, or any config object).

    Sizes shrink (hidden 64, 4 heads of 16, 2 layers or as many as the layer pattern needs,
    8 experts choosing 2, vocabulary 128, windows of 8); every other value is kept. Family
    overrides declared in the registry (:func:`twin_overrides`; a sub-config's family's inside a
    composite config), then ``overrides``, are applied last; a dict given for a sub-config updates
    it. Raises :class:`TwinError` when the config cannot be shrunk, or when AutoModelForCausalLM
    cannot build or run the type on its own (a draft model fed by its target, a causal LM that
    takes a sub-config).
    """
    if isinstance(model_type_or_config, str):
        _check_standalone(model_type_or_config)  # before its default config, which may not build
    config = _base_config(model_type_or_config)
    if not isinstance(model_type_or_config, str):
        _check_standalone(config.model_type, type(config))
    cls = type(config)
    source = config.to_dict()
    shrunk = _shrink_dict(source, top=True)
    shrunk.update(_init_only_windows(cls, shrunk))
    # a sub-config's family overrides apply inside the composite config too
    for key, value in source.items():
        if not (isinstance(value, dict) and isinstance(shrunk.get(key), dict) and "model_type" in value):
            continue
        sub_family = twin_overrides(value["model_type"])
        sub = getattr(config, key, None) if sub_family is not None else None
        if sub is not None and hasattr(sub, "model_type"):
            shrunk[key] = _merge(shrunk[key], sub_family(sub))
    family = twin_overrides(config.model_type)
    if family is not None:
        shrunk = _merge(shrunk, family(config))
    shrunk = _merge(shrunk, overrides)
    attn = shrunk.pop("_attn_implementation", None) or getattr(config, "_attn_implementation_internal", None)
    for key in ("transformers_version", "_attn_implementation_autoset", "model_type"):
        shrunk.pop(key, None)
    try:
        twin = cls.from_dict(shrunk)
    except Exception as err:
        raise TwinError(f"the shrunk {config.model_type} config does not build: {type(err).__name__}: {err}") from err
    if attn:
        twin._attn_implementation = attn
    return twin


def _deliberate(key: str, value: Any) -> bool:
    """Whether shrinking changes ``key`` on purpose (a size, a dropout, a vocabulary)."""
    if key in SIZE_KEYS or key.endswith("token_id") or key.endswith("token_index"):
        return True
    if "vocab" in key or "dropout" in key or "pdrop" in key:
        return True
    return _shrink_value(key, value, _Scale(None, None, None)) != value


def dropped_flags(original: Any, twin: Any) -> dict[str, tuple[Any, Any]]:
    """Non-size config values that differ between ``original`` and its ``twin`` (should be none).

    Per-layer lists may be shorter in the twin but must keep every distinct value. A family
    override that changes a flag shows up here; a self-check on such a twin could miss what that
    flag does."""
    a, b = original.to_dict(), twin.to_dict()
    out = {}
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if va == vb or _deliberate(k, va) or isinstance(va, dict) and isinstance(vb, dict):
            continue  # sub-configs and per-layer dicts are shrunk recursively
        if is_length_key(k) and _is_int(va) and _is_int(vb) and vb > 1:
            continue  # a length shrunk, not switched off: the self-check runs sequences that cross it
        seqs = isinstance(va, (list, tuple)) and isinstance(vb, (list, tuple))
        if seqs and {str(x) for x in va} == {str(x) for x in vb}:
            continue
        if seqs and all(_is_int(x) for x in [*va, *vb]):
            continue  # layer indices, remapped to the kept layers
        out[k] = (va, vb)
    return out


#: Words of a config key that make its integer value a number of tokens: a window, chunk, block,
#: span, stride, budget, compression, pool, kernel, ... Such values change the maths only in
#: sequences longer than them, so a check must run sequences that cross them.
LENGTH_WORDS = frozenset(
    {
        "window", "windows", "chunk", "chunks", "chunksize", "block", "blocks", "span", "spans", "local",
        "stride", "strides", "segment", "segments", "budget", "topk", "compress", "compressed", "compression",
        "extent", "floor", "distance", "context", "mem", "memory", "lookback", "horizon", "radius", "band", "swa",
        "sink", "sinks", "tokens", "pool", "kpool", "conv", "kernel", "cache", "period",
    }
)  # fmt: skip
#: Words that make a key a length even next to ``layer`` (``layer_windows``, not ``attn_layer_period``).
STRONG_LENGTH_WORDS = frozenset({"window", "windows", "chunk", "chunks", "chunksize", "span", "spans", "tokens", "swa"})
#: ``len``/``length`` is a number of tokens only next to one of these (not ``prompt_length``, ``seq_length``).
LENGTH_QUALIFIERS = frozenset({"attention", "attn", "mem", "memory", "local", "global", "cache", "context"})
#: Words of keys that hold widths, counts of layers/heads/experts, ids or other modalities' sizes.
NOT_LENGTH_WORDS = frozenset(
    {
        "layers", "head", "heads", "expert", "experts", "moe", "vocab", "hidden", "dim", "dims", "width",
        "intermediate", "rank", "group", "groups", "position", "positions", "pos", "multiple", "pattern", "types",
        "buckets", "bucket", "seed", "feed", "suppress", "forced", "bad",
        "image", "images", "vision", "visual", "audio", "video", "speech", "patch", "mel", "spatial", "temporal",
        "pixel", "frame", "frames", "query", "cls",
    }
)  # fmt: skip
#: Keys that bound a sequence's length (a length-like value at or above one can never bite).
CAPACITY_KEYS = POSITION_KEYS + ("context_length", "max_context_length", "seq_length", "max_sequence_length")
#: Sub-configs of other modalities: their windows count patches or frames, not text tokens.
MODALITY_WORDS = frozenset(
    {"vision", "visual", "image", "audio", "video", "speech", "vq", "perceiver", "qformer", "encoder", "codec"}
)


def _words(key: str) -> set[str]:
    return set(key.lower().replace("-", "_").split("_"))


def is_length_key(key: str) -> bool:
    """Whether ``key`` names a number of tokens (by its words; see :data:`LENGTH_WORDS`)."""
    words = _words(key)
    qualified_length = bool(words & {"len", "length"} and words & LENGTH_QUALIFIERS)
    if key in CAPACITY_KEYS or not (words & LENGTH_WORDS or qualified_length):
        return False
    if words & NOT_LENGTH_WORDS or key.endswith(("_id", "_ids", "_idx", "_index", "_indices", "_indexes")):
        return False
    if "layer" in words and not words & STRONG_LENGTH_WORDS:
        return False  # a layer's period, offset or index
    if key.lower().split("_")[0] in ("num", "n", "number") or "num" in words:
        return "tokens" in words  # a count of things, unless the things are tokens
    return "max" not in words or "distance" in words


def _is_sub_config(key: str, value: dict) -> bool:
    return "model_type" in value or key.endswith("_config")


def length_values(config: Any) -> list[tuple[str, int]]:
    """Every integer of ``config`` that may be a number of tokens, as (dotted path, value).

    Found by key name (:func:`is_length_key`) under any key, in nested sub-configs and plain
    dicts (a child named only by its parent, e.g. ``{"windows": {"0": 40}}``, counts), and in
    per-layer lists (their largest value); sub-configs of other modalities are skipped. Values
    below 2 (off, or a single token) are left out.
    """
    found: list[tuple[str, int]] = []

    def walk(d: dict, prefix: str, parent: str | None) -> None:
        for key, value in d.items():
            key = str(key)
            path = f"{prefix}{key}"
            named = is_length_key(key) or (parent is not None and is_length_key(f"{parent}_{key}"))
            if isinstance(value, dict):
                if _is_sub_config(key, value):
                    if not _words(key) & MODALITY_WORDS:
                        walk(value, path + ".", None)
                else:
                    walk(value, path + ".", key if parent is None else f"{parent}_{key}")
                continue
            if not named:
                continue
            if isinstance(value, (list, tuple)):
                ints = [v for v in value if _is_int(v)]
                if ints and len(ints) == sum(v is not None for v in value) and max(ints) > 1:
                    found.append((path, max(ints)))
            elif _is_int(value) and value > 1:
                found.append((path, value))

    walk(config.to_dict(), "", None)
    return found


def position_capacity(config: Any) -> int | None:
    """The longest sequence ``config``'s text model takes, when the config says (else None)."""
    try:
        text = config.get_text_config()
    except Exception:  # not a transformers config, or a composite one that cannot say
        text = config
    values = [getattr(text, k, None) for k in CAPACITY_KEYS]
    values = [v for v in values if _is_int(v) and v > 0]
    return min(values) if values else None


def config_fingerprint(config: Any) -> str:
    """A short hash of the config's values (what a cached self-check verdict is keyed on)."""
    import hashlib
    import json

    d = config.to_dict()
    for key in ("transformers_version", "_name_or_path", "architectures", "_attn_implementation_autoset"):
        d.pop(key, None)
    text = json.dumps(d, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
