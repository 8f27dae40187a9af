"""Shared fixtures and markers.

Kernel tests: without a GPU, Triton kernels run under its interpreter on CPU tensors. The interpreter is chosen
when a kernel is defined (at import), so TRITON_INTERPRET is set here, before anything imports workbench.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import workbench as wb  # noqa: E402  (after TRITON_INTERPRET)
from workbench.kernels import HAS_TRITON  # noqa: E402


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_triton = pytest.mark.skip(reason="needs Triton (Linux); the references still run everywhere")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "interpreter" in item.keywords and not HAS_TRITON:
            item.add_marker(no_triton)


@pytest.fixture(scope="session")
def kernel_device() -> str:
    """Where kernel tests run: the GPU when there is one, else CPU tensors under the Triton interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def embedded() -> wb.Model:
    """The embedded SmolLM2-135M-Instruct on CPU in float32 (loaded once per session)."""
    return wb.load(device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, wb.Model]:
    return {family: wb.tiny(family) for family in wb.models.TINY_FAMILIES}


@pytest.fixture
def tiny_llama(tiny_models) -> wb.Model:
    return tiny_models["llama"]

