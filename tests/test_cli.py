"""The command line fails cleanly: a usage error is one stderr line and exit status 2, never a
traceback and never the network; ``check --json`` writes strict JSON to stdout."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import hf_varlen_patch
from hf_varlen_patch import cli
from hf_varlen_patch.cli import main
from hf_varlen_patch.testing import tiny_config

REPO = Path(__file__).resolve().parent.parent
PREFIX = "hf-varlen-patch: error: "


@pytest.fixture
def no_network(monkeypatch):
    """Every error case must be decided before transformers loads anything (which could reach the Hub)."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"AutoConfig.from_pretrained{args} called: the CLI must not load this")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)
    yield calls
    assert not calls, calls


def _strict_json(text: str):
    def no_constant(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=no_constant)


def usage_error(capsys, argv: list[str], *needles: str) -> str:
    """Run ``main(argv)``: exit status 2, nothing on stdout, one stderr line holding every needle."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith(PREFIX) and "; " in line, line
    assert "Traceback" not in line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def _dir(tmp_path: Path, name: str, config_text: str | None = None) -> str:
    folder = tmp_path / name
    folder.mkdir()
    if config_text is not None:
        (folder / "config.json").write_text(config_text)
    return str(folder)


# --- check: what is not a model ------------------------------------------------------------------


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_missing_path(capsys, tmp_path, no_network, json_flag):
    missing = str(tmp_path / "no-such-checkpoint")
    usage_error(capsys, ["check", missing, *json_flag], missing, "does not exist", "config.json")


def test_missing_relative_path(capsys, tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    usage_error(capsys, ["check", "./llama"], "'./llama'", "does not exist")


def test_hub_id_is_not_downloaded(capsys, tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    usage_error(
        capsys,
        ["check", "some-org/some-model"],
        "'some-org/some-model'",
        "local directories only",
        "huggingface-cli download some-org/some-model",
        "snapshot_download",
        "pass that directory",
    )


def test_directory_without_config(capsys, tmp_path, no_network):
    folder = _dir(tmp_path, "empty")
    usage_error(capsys, ["check", folder], folder, "has no config.json")


def test_config_file_instead_of_its_directory(capsys, tmp_path, no_network):
    folder = _dir(tmp_path, "ckpt", '{"model_type": "llama"}')
    usage_error(capsys, ["check", os.path.join(folder, "config.json")], "is a file", "pass the directory", folder)


@pytest.mark.parametrize(
    "text, needles",
    [
        ("{not json", ("not valid JSON", "download the checkpoint's config.json again")),
        ("[1, 2]", ("not an object",)),
        ('{"vocab_size": 3}', ("has no model_type", "add it")),
        ('{"model_type": "frobnicator_lm"}', ("'frobnicator_lm'", "unknown to the installed transformers", "upgrade")),
    ],
    ids=["unparsable", "not-an-object", "no-model_type", "unknown-model_type"],
)
def test_bad_config_json(capsys, tmp_path, no_network, text, needles):
    folder = _dir(tmp_path, "ckpt", text)
    usage_error(capsys, ["check", folder], os.path.join(folder, "config.json"), *needles)


def test_unknown_model_type_lists_close_matches(capsys, no_network):
    line = usage_error(capsys, ["check", "lama"], "unknown model_type 'lama'", "hf-varlen-patch list")
    suggestions = line.split("did you mean ", 1)[1].split("?", 1)[0].split(", ")
    assert "llama" in suggestions and 1 <= len(suggestions) <= 5


def test_unknown_model_type_without_close_match(capsys, no_network):
    line = usage_error(capsys, ["check", "zzqqxx"], "'zzqqxx'", "hf-varlen-patch list")
    assert "did you mean" not in line


# --- options --------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here, so --device cuda is valid")
@pytest.mark.parametrize("command", [["check", "gpt2"], ["scan", "gpt2"]])
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda(capsys, no_network, command, device):
    usage_error(capsys, [*command, "--device", device], f"'{device}'", "CUDA is not available", "--device cpu")


@pytest.mark.parametrize("command", [["check", "gpt2"], ["scan", "gpt2"]])
def test_invalid_device(capsys, no_network, command):
    usage_error(capsys, [*command, "--device", "gpu"], "invalid --device 'gpu'", "cpu, cuda or cuda:N")


@pytest.mark.parametrize("command", [["check", "gpt2"], ["scan", "gpt2"], ["scan", "--all", "gpt2"]])
def test_unknown_backend(capsys, no_network, command):
    line = usage_error(capsys, [*command, "--backend", "flash"], "unknown --backend 'flash'", "flash_attn", "auto")
    assert all(name in line for name in hf_varlen_patch.BACKENDS)


def test_json_file_in_a_missing_folder(capsys, tmp_path, no_network):
    target = str(tmp_path / "missing" / "report.json")
    usage_error(capsys, ["check", "gpt2", "--json", target], target, "does not exist")


@pytest.mark.parametrize("flags", [[], ["--all"], ["--json"]])
def test_scan_unknown_model_type(capsys, no_network, flags):
    argv = ["scan", "llama", "lama", *flags]
    usage_error(capsys, argv, "unknown model_type 'lama'", "llama", "hf-varlen-patch list")


# --- what works -----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Some non-default generation parameters")  # save_pretrained on 4.x: the twin's top_k
def test_check_local_checkpoint_directory_json(capsys, tmp_path):
    tiny_config("llama").save_pretrained(tmp_path)
    assert main(["check", str(tmp_path), "--json"]) == 0
    out, err = capsys.readouterr()
    report = _strict_json(out)
    assert report["passed"] is True and report["rows"]
    assert report["model"] == str(tmp_path) and report["model_type"] == "llama"
    assert all(r["verdict"] == "PASS" and r["variant"] == "twin-of-checkpoint" for r in report["rows"])
    assert "PASS" in err  # the human table went to stderr


def test_check_model_type_json(capsys):
    assert main(["check", "gpt2", "--json"]) == 0
    out, _ = capsys.readouterr()
    report = _strict_json(out)
    assert set(report) >= {"model", "model_type", "transformers", "hf_varlen_patch", "rows", "passed"}
    assert report["model"] == report["model_type"] == "gpt2"
    assert report["transformers"] == transformers.__version__
    assert report["hf_varlen_patch"] == hf_varlen_patch.__version__
    assert report["passed"] is True and report["rows"]
    assert {r["model_type"] for r in report["rows"]} == {"gpt2"}
    assert all(r["verdict"] == "PASS" and r["patched"] <= 1e-5 for r in report["rows"])


def test_a_crashing_row_is_that_rows_error(capsys, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "check_config", crash)
    assert main(["check", "gpt2", "--json"]) == 1
    out, _ = capsys.readouterr()
    report = _strict_json(out)  # the row's NaN errors are null
    assert report["passed"] is False
    assert [(r["verdict"], r["note"], r["patched"]) for r in report["rows"]] == [("ERROR", "RuntimeError: boom", None)]


def test_json_has_no_nan(tmp_path):
    nan = float("nan")
    rows = [cli.Row("llama", "default", nan, math.inf, nan, "-", "REFUSED", "why")]
    target = tmp_path / "report.json"
    cli._write_json(cli.check_report("llama", "llama", rows), str(target))
    report = _strict_json(target.read_text())
    assert report["rows"][0]["upstream_no_cache"] is None and report["rows"][0]["upstream_default"] is None
    assert report["passed"] is False


def test_console_entry_missing_path(tmp_path):
    missing = str(tmp_path / "no-such-checkpoint")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "hf_varlen_patch.cli", "check", missing],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and missing in lines[0], proc.stderr


def test_check_a_vision_language_checkpoint_runs_image_samples(capsys, tmp_path):
    tiny_config("qwen2_vl").save_pretrained(tmp_path)
    assert main(["check", str(tmp_path), "--json"]) == 0
    report = _strict_json(capsys.readouterr()[0])
    assert report["model_type"] == "qwen2_vl" and report["passed"] is True
    (row,) = report["rows"]
    assert row["verdict"] == "PASS" and row["patched"] <= 1e-5
    assert row["upstream_no_cache"] > 1e-2  # the image samples' positions leak upstream
