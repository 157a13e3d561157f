"""Coverage: refusals carry their reason, unregistered types go through a self-check, the scan
classifies every type, and docs/coverage.md agrees with the registry."""

import json
import logging
import math
from pathlib import Path

import pytest
import transformers
from transformers import AutoModelForCausalLM

import hf_varlen_patch
from hf_varlen_patch import UnsupportedArchitectureError, selfcheck
from hf_varlen_patch.cli import main as cli_main
from hf_varlen_patch.coverage import causal_lm_types, scan_type
from hf_varlen_patch.coverage_doc import parse_rows
from hf_varlen_patch.registry import REGISTRY, supported_model_types
from hf_varlen_patch.testing import compare_packed, make_packed_batch, registered_variants, test_variants
from hf_varlen_patch.versions import is_tested

DOC = Path(__file__).resolve().parents[1] / "docs" / "coverage.md"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_VARLEN_PATCH_CACHE", str(tmp_path))
    selfcheck._MEMORY.clear()


@pytest.fixture
def unregistered(monkeypatch):
    """Pretend a registered model_type had no entry."""

    def drop(model_type):
        monkeypatch.delitem(REGISTRY, model_type)

    supported_model_types()  # load the entries first
    return drop


@pytest.mark.parametrize("model_type, variant", registered_variants(refused=True))
def test_refused_types_say_why(model_type, variant):
    config = test_variants(model_type)[variant]
    reason = REGISTRY[model_type].refusal(config)
    assert reason
    try:
        model = hf_varlen_patch.testing.auto_class(model_type).from_config(config)
    except Exception:
        return  # no model to apply to on this release; the entry's reason stands on its own
    with pytest.raises(UnsupportedArchitectureError, match="cannot patch") as err:
        hf_varlen_patch.apply(model)
    assert reason in str(err.value)


def test_an_unregistered_type_is_patched_after_its_self_check(unregistered, caplog):
    unregistered("olmo2")
    model = AutoModelForCausalLM.from_config(hf_varlen_patch.testing.tiny_config("olmo2"))
    with caplog.at_level(logging.WARNING, logger="hf_varlen_patch"):
        hf_varlen_patch.apply(model)
    assert "self-check" in caplog.text and "olmo2" in caplog.text
    batch = make_packed_batch([[6, 11, 2], [9, 4]], model.config.vocab_size, extra_padding=2)
    assert compare_packed(model, batch, use_cache=None).ok(1e-5)
    # the verdict is cached: a second model of the same config does not run the check again
    calls = []
    original = selfcheck._run
    selfcheck._run = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        hf_varlen_patch.apply(AutoModelForCausalLM.from_config(model.config))
    finally:
        selfcheck._run = original
    assert calls == []
    assert "olmo2" in Path(selfcheck.cache_path()).read_text()


def test_a_type_that_fails_its_self_check_is_refused_with_the_error(unregistered):
    unregistered("megatron-bert")  # attention outside the AttentionInterface: the generic route fails
    model = AutoModelForCausalLM.from_config(hf_varlen_patch.testing.tiny_config("megatron-bert"))
    with pytest.raises(UnsupportedArchitectureError, match="self-check"):
        hf_varlen_patch.apply(model)
    assert not hf_varlen_patch.is_patched(model)


def test_self_check_can_be_turned_off_or_forced(unregistered):
    unregistered("olmo2")
    model = AutoModelForCausalLM.from_config(hf_varlen_patch.testing.tiny_config("olmo2"))
    with pytest.raises(UnsupportedArchitectureError, match="no patch for model_type 'olmo2'"):
        hf_varlen_patch.apply(model, self_check="never")
    llama = hf_varlen_patch.testing.tiny_model("llama")
    hf_varlen_patch.apply(llama, self_check="always")  # a registered type, checked anyway
    assert hf_varlen_patch.is_patched(llama)
    with pytest.raises(ValueError, match="self_check"):
        hf_varlen_patch.apply(llama, self_check="sometimes")


def test_the_self_check_refuses_a_twin_that_changed_flags(monkeypatch):
    from hf_varlen_patch import registry

    config = hf_varlen_patch.testing.tiny_config("llama")
    monkeypatch.setitem(registry.TWIN_OVERRIDES, "llama", lambda _c: {"attention_bias": not config.attention_bias})
    result = selfcheck.self_check(config, use_cache=False)
    assert not result.passed and "attention_bias" in result.reason


def test_scan_rows_classify_and_show_the_upstream_leak():
    row = scan_type("olmo2")
    assert row.verdict == "PASS" and row.kind == "text" and row.upstream_default > 1e-2
    mamba = scan_type("mamba")  # recurrent: its twin's state outlives a sequence, so upstream visibly leaks
    assert mamba.kind == "hybrid" and mamba.upstream_no_cache > 1e-2
    assert mamba.verdict == ("REFUSED" if transformers.__version__.startswith("4.") else "PASS")
    assert scan_type("fuyu").verdict == "NO-ENTRY"
    assert scan_type("doge").verdict == "REFUSED"


def test_scan_all_json_on_the_command_line(capsys):
    assert cli_main(["scan", "--all", "llama", "doge", "fuyu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    verdicts = {r["model_type"]: r["verdict"] for r in report["rows"]}
    assert verdicts == {"llama": "PASS", "doge": "REFUSED", "fuyu": "NO-ENTRY"}
    assert report["transformers"] == transformers.__version__


def test_coverage_doc_agrees_with_the_registry():
    versions, rows = parse_rows(DOC.read_text())
    assert versions[0].startswith("4.") and versions[-1].startswith("5."), versions
    column = next((i for i, v in enumerate(versions) if v == transformers.__version__), None)
    registered = set(supported_model_types())
    for mt, verdicts in rows.items():
        for v in verdicts:
            if v in ("PASS", "REFUSED", "FAIL"):
                assert mt in registered, f"{mt} is {v} in docs/coverage.md but has no entry"
            if v in ("NO-ENTRY",):
                assert mt not in registered, f"{mt} has an entry now; regenerate docs/coverage.md"
            assert v != "FAIL", mt
    if column is not None:  # the doc was generated on this very release: it lists every type
        assert set(rows) >= set(causal_lm_types())
        for mt in causal_lm_types():
            assert (rows[mt][column] in ("PASS", "REFUSED")) == (mt in registered), mt


def test_tested_range():
    assert is_tested("4.57.6") and is_tested("5.17.0") and is_tested("5.24.0") and is_tested("5.25.0")
    assert not is_tested("5.26.0") and not is_tested("4.56.2")


def test_a_nan_error_is_never_hidden_by_max():
    """A NaN gradient (gemma3n_text's padding did this) must fail the scan, not pass as max()'s first value."""
    from hf_varlen_patch.testing import Comparison, worst_error

    assert math.isnan(Comparison(1e-7, 1e-7, 1e-7, math.nan).max_error)
    assert math.isnan(worst_error([1e-7, math.nan, 2e-7]))
    assert not Comparison(1e-7, 1e-7, 1e-7, math.nan).ok(1e-5)
