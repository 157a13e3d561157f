"""The GPU tools in scripts/ that CI can check without a GPU: the FA2 build trim and the trace
reader that finds where a GPU waits on the host (synthetic inputs; the real runs are on the device
tool, logged in benchmarks/)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fa2_trim_keeps_the_named_kernels_and_refuses_the_rest(tmp_path):
    """scripts/fa2_trim.py (the FA2 build that fits a GPU session): setup.py keeps only the bf16
    kernels of the kept head dims, and the dispatch routes every head dim to the smallest kept
    bucket and raises, naming the trim, for fp16 or a head dim above the largest."""
    fa2_trim = _script("fa2_trim")

    kernels = [
        f'                "csrc/flash_attn/src/flash_{kind}_hdim{d}_{dt}{c}_sm80.cu",\n'
        for kind in ("fwd", "bwd", "fwd_split")
        for d in fa2_trim.ALL_DIMS
        for dt in ("fp16", "bf16")
        for c in ("", "_causal")
    ]
    setup = (
        '            sources=[\n                "csrc/flash_attn/flash_api.cpp",\n'
        + "".join(kernels)
        + "            ],\n"
    )
    (tmp_path / "setup.py").write_text(setup)
    switch = tmp_path / "csrc/flash_attn/src/static_switch.h"
    switch.parent.mkdir(parents=True)
    branches = "".join(
        f"    {'if' if i == 0 else '}} else if'} (HEADDIM <= {d}) {{ \\\n"
        f"      constexpr static int kHeadDim = {d}; \\\n      return __VA_ARGS__(); \\\n"
        for i, d in enumerate(fa2_trim.ALL_DIMS)
    )
    switch.write_text(
        "#define FP16_SWITCH(COND, ...) \\\n  [&] { \\\n    if (COND) { \\\n"
        "      using elem_type = cutlass::half_t; \\\n"
        "      return __VA_ARGS__(); \\\n    } else { \\\n      using elem_type = cutlass::bfloat16_t; \\\n"
        "      return __VA_ARGS__(); \\\n    } \\\n  }()\n\n"
        "#define HEADDIM_SWITCH(HEADDIM, ...) \\\n  [&] { \\\n" + branches + "    } \\\n  }()\n"
    )

    assert fa2_trim.trim(tmp_path, [64, 128]) == 12
    kept = (tmp_path / "setup.py").read_text()
    assert "flash_api.cpp" in kept and kept.count(".cu") == 12
    assert "fp16" not in kept and "hdim32" not in kept and "hdim256" not in kept
    text = switch.read_text()
    assert "cutlass::half_t" not in text and "for bf16 only" in text
    assert "kHeadDim = 64" in text and "kHeadDim = 128" in text and "kHeadDim = 96" not in text
    assert "head dims <= 128 only" in text

    switch.write_text("#define OTHER_SWITCH(COND, ...) [&] {}()\n")  # another release's layout
    with pytest.raises(SystemExit, match="no FP16_SWITCH macro"):
        fa2_trim.trim(tmp_path, [64, 128])


def test_trace_gaps_blames_each_idle_gap_on_the_host_op_that_launched_the_next_kernel(tmp_path):
    """Three kernels with idle gaps of 50 and 30 us; the second and third kernels were launched
    from inside two different ops of two phases, the third from another thread (as autograd's
    backward is): each gap must go to that op and phase, and busy / idle must add up to the GPU's
    span."""
    trace_gaps = _script("trace_gaps")

    def x(cat, name, ts, dur, tid=1, **args):
        return dict(ph="X", cat=cat, name=name, ts=ts, dur=dur, tid=tid, pid=1, args=args)

    events = [
        x("user_annotation", "Optimizer.zero_grad#SGD.zero_grad", 105, 30),  # torch's own: not a phase
        x("user_annotation", "step::forward", 0, 100),
        x("cpu_op", "aten::mm", 5, 10),
        x("cuda_runtime", "cudaLaunchKernel", 6, 2, correlation=1),
        x("cpu_op", "hf_varlen::attention", 40, 50),
        x("cpu_op", "aten::copy_", 60, 20),
        x("cuda_runtime", "cudaLaunchKernel", 70, 2, correlation=2),
        x("user_annotation", "step::backward", 100, 100),
        x("cpu_op", "autograd::mm_backward", 110, 20, tid=2),  # autograd's own thread
        x("cuda_driver", "cuLaunchKernelEx", 115, 2, tid=2, correlation=3),
        x("kernel", "gemm", 10, 20, tid=7, correlation=1),  # busy 10-30
        x("kernel", "copy", 80, 20, tid=7, correlation=2),  # idle 30-80: 50 us
        x("kernel", "gemm_bwd", 130, 10, tid=7, correlation=3),  # idle 100-130: 30 us
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    result = trace_gaps.gaps(trace_gaps.load(path), min_us=20)
    assert result["busy_us"] == 50 and result["idle_us"] == 80
    assert result["by_phase"] == {"step::forward": 50, "step::backward": 30}
    assert result["by_op"] == {"aten::copy_": 50, "autograd::mm_backward": 30}
    assert result["gaps"][0]["outer_op"] == "hf_varlen::attention"
    assert "step::forward 0.05 ms" in trace_gaps.report(result)
    assert trace_gaps.gaps(trace_gaps.load(path), min_us=40)["by_op"] == {"aten::copy_": 50}


def test_bench_preference_rl_tiny_runs_every_row_and_passes_its_check(tmp_path, monkeypatch):
    """scripts/bench_preference_rl.py --tiny (the CPU smoke mode of the DPO / GRPO benchmark, llama):
    every row of the three workloads runs (none FAILED), the padded and unpad=True log-probs of the
    first right-padded DPO batch agree in float32, and the table and JSON are written."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_preference_rl.py"
    spec = importlib.util.spec_from_file_location("bench_preference_rl", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_preference_rl", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)

    small = ["--steps", "1", "--pairs", "4", "--prompts", "2", "--group", "4", "--micro-batch", "4"]
    results = bench.main(["--tiny", "--model", "llama", *small, "--out", str(tmp_path), "--name", "tiny"])
    rows = [r.row for r in results]
    assert len(rows) == 8 and sum(r.startswith("DPO step") for r in rows) == 2
    assert sum(r.startswith("GRPO log-probs") for r in rows) == 4 and sum(r.startswith("GRPO train") for r in rows) == 2
    assert all(not r.note.startswith("FAILED") and r.steps == 1 and r.tokens_per_s > 0 for r in results)
    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert [r["row"] for r in saved["results"]] == rows
    check = saved["meta"]["checks"]["dpo"]
    assert check["passed"] and check["max_abs_diff"] < 1e-4
    assert saved["meta"]["checks"]["grpo"]["unpad_vs_token_logprobs"]["max_abs_diff"] < 1e-4
    table = (tmp_path / "tiny.md").read_text()
    assert "tokens/s vs padded" in table and "DPO step: unpad=True" in table
