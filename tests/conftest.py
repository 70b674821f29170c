"""Test set-up: without a GPU, Triton kernels run in Triton's interpreter on CPU tensors.

TRITON_INTERPRET must be set before any kernel is defined, so this runs before the package is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    """Tensors live on the GPU when there is one, else on the CPU (Triton interpreter)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread avoids OpenMP contention on a busy CI box (modules opt in with usefixtures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
