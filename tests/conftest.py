import logging
import os
from collections import Counter

import pytest
import torch

# Importing transformers.processing_utils runs transformers/__init__.py a second time
# (transformers' direct_transformers_import), which puts a new module object in
# sys.modules["transformers"]; every module that imported transformers earlier keeps the old one.
# Done by whichever test first builds a model, that would make `transformers` in a test module and
# in the engine two objects depending on test order (a monkeypatched transformers.__version__ then
# misses the engine). Importing it here, before any test module or the engine, gives the whole
# session one transformers module.
import transformers.processing_utils  # noqa: F401,I001
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("HF_VARLEN_EXAMPLES", "12")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile("thorough", max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# one intra-op thread per pytest-xdist worker (more oversubscribes the cores and slows all of them)
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(4, (os.cpu_count() or 1) // _workers)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A CUDA fault (an illegal or misaligned access in some kernel) poisons the process's CUDA
    context: every later test in it would fail with the same error. Under pytest-xdist the worker
    exits instead, xdist reports this test as crashed (by name, so it still fails) and starts a
    fresh worker for the rest."""
    outcome = yield
    report = outcome.get_result()
    error = call.excinfo.value if call.excinfo is not None else None
    if report.failed and os.environ.get("PYTEST_XDIST_WORKER") and "CUDA error" in str(error):
        print(f"\n{item.nodeid}: {str(error).splitlines()[0]}; this worker exits", flush=True)
        os._exit(3)


@pytest.fixture(autouse=True)
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("hf_varlen_patch").setLevel(logging.WARNING)
    yield


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps its state (mixed precision among it) in process-wide singletons, which
    transformers 4.57's Trainer does not reset: one bf16 run would make later runs bf16 too."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture
def fla_stand_ins(monkeypatch):
    """Route the recurrent layers' fla kernels to exact torch-op stand-ins with fla's signatures
    ((1, N, ...) streams cut by an int64 ``cu_seqlens``): the kernel path's flattening, on CPU.
    Calling the fixture installs them (``compiled_like_fla=True``: marked
    ``torch.compiler.disable``, as fla marks its delta rules) and returns the list of the
    cu_seqlens tensors they are handed. A unit test only: the real kernels run in tests/test_gpu.py."""
    from hf_varlen_patch.recurrent import _activation, kernels, torch_ops

    def install(compiled_like_fla: bool = False) -> list:
        seen = []

        def seq_of(cu):
            return torch.repeat_interleave(torch.arange(cu.numel() - 1), cu.diff())[None]

        def gated_delta_rule(q, k, v, g, beta, *, initial_state=None, output_final_state=False,
                             use_qk_l2norm_in_kernel=False, cu_seqlens=None):  # fmt: skip
            assert q.shape[0] == 1 and initial_state is None and cu_seqlens.dtype == torch.int64
            seen.append(cu_seqlens)
            return torch_ops.chunked_delta_rule(
                q, k, v, g, beta, seq_of(cu_seqlens),
                output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
            )  # fmt: skip

        def conv(x, weight, bias, activation=None, cu_seqlens=None):
            assert x.shape[0] == 1 and cu_seqlens.dtype == torch.int64
            seen.append(cu_seqlens)
            y = torch_ops.causal_conv1d(x.transpose(1, 2), weight, bias, seq_of(cu_seqlens), _activation(activation))
            return y.transpose(1, 2), None

        fakes = {"gated_delta_rule": gated_delta_rule, "fla_causal_conv1d": conv}
        if compiled_like_fla:
            fakes = {name: torch.compiler.disable(fn) for name, fn in fakes.items()}
        monkeypatch.setattr(kernels, "kernel", lambda name, *tensors: fakes.get(name))
        return seen

    return install


def pytest_terminal_summary(terminalreporter, config):
    """Skips in the short summary, with the GPU tests (hundreds, all for one reason where there is
    no CUDA device) counted on one line per reason instead of one line per test function."""
    if "s" in terminalreporter.reportchars:
        return
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if isinstance(r.longrepr, tuple)]
    if not skipped:
        return
    gpu = Counter(r.longrepr[2].removeprefix("Skipped: ") for r in skipped if "gpu" in r.keywords)
    other = Counter(r.longrepr for r in skipped if "gpu" not in r.keywords)
    terminalreporter.section("skipped", sep="-")
    for reason, n in gpu.items():
        terminalreporter.line(f"{n} gpu tests skipped: {reason}")
    for (path, lineno, reason), n in sorted(other.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        where = os.path.relpath(path, terminalreporter.startpath) + ("" if lineno is None else f":{lineno}")
        terminalreporter.line(f"SKIPPED [{n}] {where}: {reason.removeprefix('Skipped: ')}")
