"""The GPU tools in scripts/ that CI can check without a GPU: the FA2 build trim and the trace
reader that finds where a GPU waits on the host (synthetic inputs; the real runs are on the device
tool, logged in benchmarks/)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import transformers


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


@pytest.mark.parametrize("case", ["gdn", "kda", "conv", "ssd"])
def test_the_kernel_checks_inputs_would_show_a_leak(case, monkeypatch):
    """scripts/gpu_kernel_check.py's control, on the CPU with the exact float32 ops: its inputs run as
    one row without boundaries land well over twice the bf16 noise (about 5e-3 on the GPU) from each
    sequence alone, so a kernel that leaked could not pass its 2x-noise bar."""
    check = _script("gpu_kernel_check")
    monkeypatch.setattr(check, "DEVICE", "cpu")
    name, spec = check.CASES[case]
    result = check.leak_control(spec, [1, 300, 37, 64, 65, 2, 129])
    assert result["leak_without_boundaries"] > 2e-2, (name, result)
    assert result["leak_first_16_tokens_after_each_boundary"] > 1e-1, (name, result)


def test_triton_first_config_times_configs_in_order_until_one_fits(monkeypatch):
    """scripts/triton_first_config.py (the GPU staging's sitecustomize, TRITON_CONFIGS=first), on a
    stand-in for Triton's Autotuner: a configuration out of shared memory is passed over, the first
    that runs is taken, and the ones after it are never compiled; each tuning starts afresh. A
    configuration that runs out of shared memory at a later launch (other compile-time constants,
    same tuning key) is dropped and the kernel tuned again."""
    import math
    import types

    benched, launched = [], []

    class OutOfResources(Exception):
        pass

    class Autotuner:
        def __init__(self):
            self.configs, self.cache = ["too_big", "fits", "also_fits"], {}

        def prune_configs(self, kwargs):
            return list(self.configs)

        def _bench(self, *args, config, **meta):
            benched.append(config)
            return [math.inf] * 3 if config == "too_big" else [1.0, 1.0, 1.0]

        def tune(self):  # what Autotuner.run does with the pruned configs
            timings = {c: self._bench(config=c) for c in self.prune_configs({})}
            return min(timings, key=timings.get)

        def run(self, variant):  # Autotuner.run: tune once per key, then launch
            if "key" not in self.cache:
                self.cache["key"] = self.tune()
            self.best_config = self.cache["key"]
            launched.append((variant, self.best_config))
            if variant == "bigger" and self.best_config == "fits":
                raise OutOfResources("shared memory")
            return self.best_config

    autotuner = types.ModuleType("triton.runtime.autotuner")
    autotuner.Autotuner = Autotuner
    errors = types.ModuleType("triton.runtime.errors")
    errors.OutOfResources = OutOfResources
    runtime = types.ModuleType("triton.runtime")
    runtime.autotuner, runtime.errors = autotuner, errors
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    monkeypatch.setitem(sys.modules, "triton.runtime", runtime)
    monkeypatch.setitem(sys.modules, "triton.runtime.autotuner", autotuner)
    monkeypatch.setitem(sys.modules, "triton.runtime.errors", errors)
    monkeypatch.setenv("TRITON_CONFIGS", "first")
    _script("triton_first_config")
    tuner = Autotuner()
    assert tuner.tune() == "fits" and benched == ["too_big", "fits"]
    assert tuner.tune() == "fits" and benched == ["too_big", "fits", "too_big", "fits"]

    tuner = Autotuner()
    assert tuner.run("plain") == "fits"
    assert tuner.run("bigger") == "also_fits"
    assert launched[-2:] == [("bigger", "fits"), ("bigger", "also_fits")]
    assert tuner.configs == ["too_big", "also_fits"] and tuner.run("plain") == "also_fits"
    with pytest.raises(OutOfResources):  # nothing left to fall back on: the error stands
        tuner.configs = ["fits"]
        tuner.cache.clear()
        tuner.run("bigger")


@pytest.mark.skipif(
    transformers.__version__.startswith("4."),
    reason="the benchmark's hybrids (qwen3_5_text, bamba) are patched on transformers 5.x only",
)
@pytest.mark.parametrize("model", ["qwen3_5", "bamba"])
def test_bench_hybrid_tiny_runs_the_three_rows(model, tmp_path):
    """scripts/bench_hybrid.py --tiny on the CPU: (a) padded upstream, (b) packed with the torch ops
    and (c) packed with the kernels setting (torch ops here: no CUDA) all run, for both models."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_hybrid.py"
    args = ["--tiny", "--device", "cpu", "--model", model, "--dists", "flan", "--steps", "1", "--warmup", "0"]
    args += ["--backends", "sdpa+ops,sdpa+kernels", "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads(next(tmp_path.glob("hybrid_padding_vs_packing_*.json")).read_text())
    rows = [r["row"] for r in saved["results"]]
    assert [r.split(":")[1].strip()[:3] for r in rows] == ["(a)", "(b)", "(c)"], rows
    assert all(not r["note"].startswith("FAILED") for r in saved["results"]), saved["results"]
    assert saved["meta"]["model"] == model
