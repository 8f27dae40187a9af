"""Shared fixtures and markers.

Kernel tests: without a GPU, Triton kernels run under its interpreter on CPU tensors. The interpreter is chosen
when a kernel is defined (at import), so TRITON_INTERPRET is set here, before anything imports workbench.
"""

import os
import shutil
from pathlib import Path

import pytest
import torch

INTERPRETER_FOR_TESTS = "WORKBENCH_TESTS_SET_TRITON_INTERPRET"

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ[INTERPRETER_FOR_TESTS] = "1"  # set here, for the kernel tests only (notebooks/conftest.py)

import workbench as wb  # noqa: E402  (after TRITON_INTERPRET)
from workbench.kernels import HAS_TRITON  # noqa: E402

# Debian's chromium (never a downloaded browser) for the tests that drive a real browser through Playwright
CHROMIUM = os.environ.get("WORKBENCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


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


@pytest.fixture(scope="session")
def one_layer() -> wb.Model:
    """A tiny GQA model (4 query heads over 2 KV heads) with a single layer: the prefill's last layer is layer 0."""
    return wb.tiny("llama", num_hidden_layers=1)



def _missing_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright's Python client is not installed (pip install -e '.[dev]')"
    if not Path(CHROMIUM).exists():
        return f"no chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)"
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    """The chromium binary Playwright drives (`WORKBENCH_CHROMIUM`, else `chromium` on PATH); the test is skipped
    without it or Playwright, and fails instead under WORKBENCH_REQUIRE_BROWSER=1."""
    reason = _missing_browser()
    if reason is not None:
        if os.environ.get("WORKBENCH_REQUIRE_BROWSER") == "1":
            pytest.fail(f"WORKBENCH_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return CHROMIUM
