"""Shared test set-up: seeds, markers (gpu, slow), and session-cached quantized tiny policies."""
import os
import sys
import warnings

# module() compiles with Inductor by default (minutes of C++ compiles on this box): the suite runs the eager programs;
# tests/test_compiled_default.py unsets this to test the default.
os.environ.setdefault("QVLA_COMPILE", "0")

# Under xdist every worker would start one intra-op thread per core: 2 workers × 2 threads on 2 cores oversubscribe
# and each small op waits on the other worker's threads. Share the cores out (before torch is imported; subprocesses
# the tests start inherit it).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

# Without a GPU, Triton kernels run in its interpreter; the variable must be set before anything imports triton.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # toy_models
warnings.filterwarnings("ignore", category=FutureWarning)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped, visibly, without one)")
    config.addinivalue_line("markers", "slow: small-preset policies; part of the default run")
    config.addinivalue_line("markers", "small: repeats of checks other default tests cover (small presets); deselected by default")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
