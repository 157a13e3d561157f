import logging
import os

import pytest
import torch
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
