"""Test-session setup: without a GPU, Triton kernels run on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before any @triton.jit function is defined (at import of
mmfast.kernels), so it is set here, before test modules import anything.
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from numerics import SEED  # noqa: E402


def pytest_report_header(config):
    mode = "CUDA: " + torch.cuda.get_device_name() if HAS_CUDA else "CPU: Triton kernels through the interpreter"
    return [f"mmfast tests on {mode}", f"random seed {SEED} (set MMFAST_TEST_SEED to replay)"]


# "cuda" always: `pytest -m cuda` selects these on a GPU machine, and without one they skip with the reason
@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    return torch.device(request.param)


@pytest.fixture
def matmul_precision():
    """torch.set_float32_matmul_precision for one test; the setting is restored afterwards."""
    saved = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(saved)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the marks added here count
def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device; the same logic runs on the CPU path in this suite")
    for item in items:
        # modules that run on DEVICE = "cuda" when there is one exercise CUDA tensors: they are `-m cuda` too
        if HAS_CUDA and getattr(getattr(item, "module", None), "DEVICE", None) == "cuda":
            item.add_marker(pytest.mark.cuda)
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    # On a CUDA machine Triton compiles for the GPU and has no interpreter for CPU tensors: the CPU-device
    # Triton cases cannot run in this process (TRITON_INTERPRET is decided when the kernels are defined).
    # They skip with that reason; the same cases run on the cuda device parameter, and on CPU-only
    # machines (CI) through the interpreter.
    try:
        return (yield)
    except ValueError as exc:
        if HAS_CUDA and "TRITON_INTERPRET=1" in str(exc):
            pytest.skip("CPU tensors on backend='triton' need Triton's interpreter, which a CUDA machine's test "
                        "process does not use; the cuda parameter runs the same case")
        raise
