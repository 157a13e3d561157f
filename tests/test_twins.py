"""Tiny twins: every causal LM of the installed transformers shrinks (or says why not), keeping the
flags that change attention and positions."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hf_varlen_patch.coverage import causal_lm_types
from hf_varlen_patch.testing import tiny_config
from hf_varlen_patch.twins import TwinError, dropped_flags


@pytest.mark.parametrize("model_type", causal_lm_types())
def test_every_causal_lm_builds_a_small_twin_or_says_why(model_type):
    try:
        twin = tiny_config(model_type)
    except TwinError as err:
        assert str(err), model_type
        return
    default = AutoConfig.for_model(model_type)
    assert twin.model_type == default.model_type
    from hf_varlen_patch.twins import twin_overrides

    if twin_overrides(model_type) is None:
        assert dropped_flags(default, twin) == {}, model_type
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(twin)
    except Exception:
        return  # recorded as UNBUILDABLE by the scan, with the reason
    assert sum(p.numel() for p in model.parameters()) < 20_000_000, model_type


def test_flags_that_change_attention_survive():
    gemma2 = tiny_config(AutoConfig.for_model("gemma2", attn_logit_softcapping=30.0, final_logit_softcapping=20.0))
    assert gemma2.attn_logit_softcapping == 30.0 and gemma2.final_logit_softcapping == 20.0
    assert gemma2.sliding_window == 8 and gemma2.hidden_size == 64
    gemma3 = tiny_config("gemma3_text")
    assert set(gemma3.layer_types) == {"sliding_attention", "full_attention"}
    assert len(gemma3.layer_types) == gemma3.num_hidden_layers <= 6  # one period of its 5:1 pattern
    ds = tiny_config("deepseek_v3")
    assert ds.kv_lora_rank < 512 and ds.q_lora_rank < 1536 and ds.qk_rope_head_dim % 2 == 0
    assert ds.n_routed_experts == 8 and ds.num_experts_per_tok == 2 and ds.topk_group <= ds.n_group
    mixtral = tiny_config(AutoConfig.for_model("mixtral", router_jitter_noise=0.1))
    assert mixtral.router_jitter_noise == 0.0
    gptj = tiny_config("gptj")
    assert 0 < gptj.rotary_dim < gptj.n_embd // gptj.n_head  # partial rotary kept partial
    falcon = tiny_config(AutoConfig.for_model("falcon", alibi=True, parallel_attn=True))
    assert falcon.alibi and falcon.parallel_attn
    olmo2 = tiny_config("olmo2")
    assert olmo2.num_hidden_layers <= 3 and olmo2.vocab_size == 128


def test_a_users_config_keeps_its_sizes_relations():
    config = AutoConfig.for_model(
        "llama", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336
    )
    twin = tiny_config(config)
    assert (twin.hidden_size, twin.num_attention_heads, twin.num_key_value_heads) == (64, 4, 2)
    assert twin.intermediate_size == 224  # 3.5 x hidden, as the original
    assert twin.rope_parameters == config.rope_parameters if hasattr(config, "rope_parameters") else True


def test_overrides_win():
    assert tiny_config("llama", num_hidden_layers=3).num_hidden_layers == 3


def test_unknown_model_type_is_a_twin_error():
    with pytest.raises(TwinError, match="no config"):
        tiny_config("not-a-model")


def test_twins_widen_to_a_minimum_head_dim_where_they_can():
    """``tiny_model(..., min_head_dim=32)`` (the flash GPU tests' twins, FA4 trains no narrower
    heads): heads reach 32 by a wider hidden size; MLA twins, whose head dims are their own, come
    as they are; packing stays exact on the wider twin."""
    import hf_varlen_patch
    from hf_varlen_patch.testing import compare_packed, make_packed_batch, tiny_model

    narrow, wide = tiny_model("llama"), tiny_model("llama", min_head_dim=32)
    assert narrow.config.head_dim < 32 <= wide.config.head_dim
    assert wide.config.hidden_size == narrow.config.hidden_size * 32 // narrow.config.head_dim
    mla = tiny_model("deepseek_v3", min_head_dim=32)
    assert mla.config.hidden_size == tiny_model("deepseek_v3").config.hidden_size
    hf_varlen_patch.apply(wide)
    batch = make_packed_batch([[5, 9, 3], [17]], wide.config.vocab_size, extra_padding=2, seed=3)
    assert compare_packed(wide, batch).ok(1e-5)


def test_lengths_the_twin_knows_shrink_below_the_test_lengths():
    """Windows and top-k budgets under known keys end below the self-check's sequences, also where
    the config derives one from another (5.x ModernBERT-decoder's window from its local_attention)."""
    from transformers import CONFIG_MAPPING

    from hf_varlen_patch.selfcheck import LAYOUTS, check_layouts

    modernbert = tiny_config("modernbert-decoder")
    assert 1 < modernbert.sliding_window <= 8 and getattr(modernbert, "local_attention", 8) <= 8
    for model_type in ("deepseek_v32", "glm_moe_dsa", "axk2"):  # DeepSeek sparse attention's top-k keys
        if model_type in CONFIG_MAPPING:
            assert tiny_config(model_type).index_topk == 8
    for model_type in ("modernbert-decoder", "gemma2", "mistral", "qwen2"):
        assert check_layouts(AutoConfig.for_model(model_type))[0] == LAYOUTS  # nothing left to cross
