"""The self-check vouches only for what it ran: every length-like config value is crossed by its
test sequences (or refused, naming the key), and a cached verdict holds only for the code it ran."""

import importlib
import math
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention

import hf_varlen_patch
from hf_varlen_patch import UnsupportedArchitectureError, selfcheck
from hf_varlen_patch.api import apply_entry
from hf_varlen_patch.coverage import causal_lm_types
from hf_varlen_patch.registry import REGISTRY, PatchEntry, supported_model_types
from hf_varlen_patch.registry import TWIN_OVERRIDES as _OVERRIDES
from hf_varlen_patch.testing import compare_packed, make_packed_batch
from hf_varlen_patch.twins import TwinError, is_length_key, length_values, tiny_config

SMALL = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    num_hidden_layers=2,
    vocab_size=128,
    max_position_embeddings=4096,
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_VARLEN_PATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(selfcheck, "_MEMORY", {})


# ------------------------------------------------------------------ a window under a key of its own


class LocalWindowConfig(LlamaConfig):
    """A user's Llama variant whose sliding window sits under a key no twin knows."""

    model_type = "varlen_test_local_window"


class LocalWindowAttention(LlamaAttention):
    """Passes its window to the attention function the way Mistral passes ``sliding_window``."""

    def forward(self, *args, **kwargs):
        kwargs["sliding_window"] = self.config.local_attention_tokens
        return super().forward(*args, **kwargs)


class LocalWindowForCausalLM(LlamaForCausalLM):
    config_class = LocalWindowConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.self_attn.__class__ = LocalWindowAttention


class PlainForCausalLM(LlamaForCausalLM):
    """The same config read by a model that ignores the key: nothing for the check to catch."""

    config_class = LocalWindowConfig


AutoConfig.register(LocalWindowConfig.model_type, LocalWindowConfig, exist_ok=True)
AutoModelForCausalLM.register(LocalWindowConfig, LocalWindowForCausalLM, exist_ok=True)


def _model(cls=LocalWindowForCausalLM, **config):
    torch.manual_seed(0)
    return cls(LocalWindowConfig(**{**SMALL, "local_attention_tokens": 40, **config})).float()


def test_a_window_under_an_unknown_key_is_crossed_and_refused():
    """The window (40) is longer than every sequence of the base layouts (at most 12): they pass,
    and the model is wrong at 60 tokens. The check now runs sequences of 42 and refuses it."""
    model = _model()
    probe = _model()
    apply_entry(probe, PatchEntry(family=selfcheck.GENERIC_FAMILY, model_types=(LocalWindowConfig.model_type,)))
    layouts = selfcheck.LAYOUTS
    short = [compare_packed(probe, make_packed_batch(vocab_size=128, **layout)).max_error for layout in layouts]
    assert max(short) < 1e-5  # what the twin used to see
    assert compare_packed(probe, make_packed_batch([[5, 60, 7]], 128)).max_error > 1e-3  # wrong at 60

    layouts, crossed = selfcheck.check_layouts(model.config)
    assert crossed == "local_attention_tokens = 40"
    assert max(n for layout in layouts for row in layout["rows"] for n in row) > 41
    with pytest.raises(UnsupportedArchitectureError, match="local_attention_tokens = 40") as err:
        hf_varlen_patch.apply(model)
    assert "differ by" in str(err.value)
    assert not hf_varlen_patch.is_patched(model)


def test_a_crossed_window_that_the_route_handles_passes():
    """No false refusal: the same key on a model that does not use it passes, after the long sequences."""
    calls = []
    original = selfcheck._run
    model = _model(PlainForCausalLM)
    try:
        selfcheck._run = lambda twin, entry, cls, layouts: calls.append(layouts) or original(twin, entry, cls, layouts)
        hf_varlen_patch.apply(model)
    finally:
        selfcheck._run = original
    assert hf_varlen_patch.is_patched(model)
    assert max(n for layout in calls[0] for row in layout["rows"] for n in row) == 42


def test_a_length_beyond_the_check_is_refused_naming_the_key(monkeypatch):
    model = _model(PlainForCausalLM, local_attention_tokens=4000)
    result = selfcheck.self_check(model.config, model_class=type(model))
    assert not result.passed
    assert "local_attention_tokens = 4000" in result.reason and "register_twin_overrides" in result.reason
    with pytest.raises(UnsupportedArchitectureError, match="local_attention_tokens = 4000"):
        hf_varlen_patch.apply(model)
    # a window the model's sequences cannot reach (its positions stop first) is nothing to cross
    short = _model(PlainForCausalLM, local_attention_tokens=4000, max_position_embeddings=512)
    assert selfcheck.check_layouts(short.config) == (selfcheck.LAYOUTS, "")
    # the fix the message names: the twin shrinks the key, and the check crosses the shrunk value
    monkeypatch.setitem(_OVERRIDES, LocalWindowConfig.model_type, lambda _c: {"local_attention_tokens": 8})
    assert selfcheck.self_check(model.config, model_class=type(model)).passed
    windowed = _model(local_attention_tokens=4000)
    assert not selfcheck.self_check(windowed.config, model_class=type(windowed)).passed


def test_length_values_under_any_key_sub_config_and_per_layer_list():
    config = LocalWindowConfig(
        **SMALL,
        attention_span=300,
        layer_windows=[None, 64],
        attn={"chunk_len": 96, "n_heads": 4},
        text_config={"model_type": "x", "segment_size": 48, "hidden_size": 512},
        vision_config={"model_type": "y", "window_size": 112},
        extra={"original_max_position_embeddings": 8192, "beta_fast": 32, "window_factor": 2.0},
    )
    found = dict(length_values(config))
    assert found == {"attention_span": 300, "layer_windows": 64, "attn.chunk_len": 96, "text_config.segment_size": 48}


@pytest.mark.parametrize(
    "key",
    [
        "max_position_embeddings", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "head_dim",
        "num_local_experts", "max_window_layers", "sliding_window_pattern", "attn_layer_period",
        "chunk_size_feed_forward", "block_multiple_of", "num_random_blocks", "context_length", "prompt_length",
        "moe_topk", "topk_group",
        "global_attn_every_n_layers", "num_image_tokens", "begin_suppress_tokens", "pad_token_id", "segment_types",
    ],
)  # fmt: skip
def test_sizes_counts_and_ids_are_not_lengths(key):
    assert not is_length_key(key)


@pytest.mark.parametrize(
    "key",
    [
        "sliding_window", "local_attention_tokens", "attention_span", "block_size", "chunk_size", "segment_length",
        "attention_length", "mem_len", "index_topk", "index_pool_size", "index_num_local_tokens", "rel_extent",
        "log_scaling_n_floor", "layer_windows", "global_attn_every_n_tokens", "heavily_compressed_attention",
    ],
)  # fmt: skip
def test_token_counts_are_lengths(key):
    assert is_length_key(key)


def test_no_type_its_entry_accepts_is_refused_for_its_lengths():
    """Every causal LM of the installed transformers that its entry does not refuse gets layouts
    that cross its lengths: the rule refuses none of them for a value it cannot reach."""
    from transformers import CONFIG_MAPPING

    supported_model_types()
    refused = {}
    for model_type in causal_lm_types():
        entry = REGISTRY.get(model_type)
        try:
            config = CONFIG_MAPPING[model_type]()
            if entry is not None and entry.refusal(config):
                continue
            twin = tiny_config(config)
        except Exception:
            continue  # no twin: UNBUILDABLE in the scan, for its own reason
        try:
            selfcheck.check_layouts(config, twin)
        except TwinError as err:
            refused[model_type] = str(err)
    # 4.57's deprecated transfo-xl (no entry) keeps a memory of mem_len = 1600 tokens from earlier
    # calls, longer than any check; its twin does not run on sdpa either way
    assert set(refused) <= {"transfo-xl"}, refused


# ------------------------------------------------------------------ a cached verdict and changed code

MODELING = '''
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP


class EditedConfig(LlamaConfig):
    model_type = "varlen_test_edited"


class RowMixerMLP(LlamaMLP):
    """Adds a running mean over the whole row: causal, but it crosses packed sequences."""

    def forward(self, x):
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[None, :, None]
        return super().forward(x) + 0.5 * x.cumsum(dim=1) / steps


class EditedForCausalLM(LlamaForCausalLM):
    config_class = EditedConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp.__class__ = {mlp}
'''


def _edited_module(tmp_path, monkeypatch, mlp):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "varlen_test_edited.py").write_text(textwrap.dedent(MODELING.format(mlp=mlp)))
    if "varlen_test_edited" in sys.modules:
        module = importlib.reload(sys.modules["varlen_test_edited"])
    else:
        module = importlib.import_module("varlen_test_edited")
    AutoConfig.register(module.EditedConfig.model_type, module.EditedConfig, exist_ok=True)
    AutoModelForCausalLM.register(module.EditedConfig, module.EditedForCausalLM, exist_ok=True)
    torch.manual_seed(0)
    return module.EditedForCausalLM(module.EditedConfig(**SMALL))


def test_a_cached_pass_is_not_reused_for_changed_modeling_code(tmp_path, monkeypatch):
    runs = []
    original = selfcheck._run
    monkeypatch.setattr(selfcheck, "_run", lambda *a: runs.append(1) or original(*a))
    monkeypatch.delitem(sys.modules, "varlen_test_edited", raising=False)

    clean = _edited_module(tmp_path, monkeypatch, "LlamaMLP")
    hf_varlen_patch.apply(clean)
    assert runs == [1]
    again = _edited_module(tmp_path, monkeypatch, "LlamaMLP")  # the same code, in a fresh module object
    hf_varlen_patch.apply(again)
    assert runs == [1]  # the verdict is reused

    leaky = _edited_module(tmp_path, monkeypatch, "RowMixerMLP")  # the file changed, the config did not
    assert selfcheck.config_fingerprint(leaky.config) == selfcheck.config_fingerprint(clean.config)
    with pytest.raises(UnsupportedArchitectureError, match="differ by"):
        hf_varlen_patch.apply(leaky)
    assert runs == [1, 1]
    # and the disk cache (a new process) keys on the code too: both verdicts are there, apart
    monkeypatch.setattr(selfcheck, "_MEMORY", {})
    verdicts = {v["passed"] for v in selfcheck._load_disk().values() if v["model_type"] == "varlen_test_edited"}
    assert verdicts == {True, False}
    with pytest.raises(UnsupportedArchitectureError, match="differ by"):
        hf_varlen_patch.apply(_edited_module(tmp_path, monkeypatch, "RowMixerMLP"))
    assert runs == [1, 1]


def test_the_code_digest_follows_classes_files_and_the_engine(monkeypatch):
    one, two = {"__name__": "user_notebook"}, {"__name__": "user_notebook"}  # one cell run twice, edited
    exec("class Layer:\n    def forward(self, x):\n        return x + 1\n", one)
    exec("class Layer:\n    def forward(self, x):\n        return x + 2\n", two)
    assert one["Layer"].__qualname__ == two["Layer"].__qualname__
    assert selfcheck.code_digest([one["Layer"]]) != selfcheck.code_digest([two["Layer"]])
    assert selfcheck.code_digest([one["Layer"]]) == selfcheck.code_digest([one["Layer"]])
    base = selfcheck.code_digest([LlamaForCausalLM])
    monkeypatch.setattr(selfcheck, "_ENGINE_HASH", ["another engine"])
    assert selfcheck.code_digest([LlamaForCausalLM]) != base
    monkeypatch.setattr(selfcheck, "_ENGINE_HASH", [])
    assert selfcheck.code_digest([LlamaForCausalLM]) == base
    # torch's own classes are keyed by torch's version, not hashed one by one
    assert selfcheck.code_digest([LlamaForCausalLM, torch.nn.Linear]) == base


def test_a_twin_that_does_not_build_is_a_failed_verdict_not_a_crash():
    config = LocalWindowConfig(**SMALL, local_attention_tokens=40)
    result = selfcheck.self_check(config, model_class=type("Broken", (PlainForCausalLM,), {"__init__": None}))
    assert not result.passed and math.isnan(result.error) and "twin failed" in result.reason
