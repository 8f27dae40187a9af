"""nbval runs the tutorials as a reader would: without the Triton interpreter that tests/conftest.py turns on for
the kernel tests when `pytest tests notebooks` runs both. A notebook's kernel inherits the environment when it
starts (at its first cell's setup); with TRITON_INTERPRET=1 every flash call of a tutorial would run under the
interpreter instead of the kernel's torch reference, minutes instead of seconds on a CPU."""

import os

import pytest

INTERPRETER_FOR_TESTS = "WORKBENCH_TESTS_SET_TRITON_INTERPRET"  # set by tests/conftest.py beside TRITON_INTERPRET


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_setup(item):
    saved = os.environ.pop("TRITON_INTERPRET", None) if os.environ.get(INTERPRETER_FOR_TESTS) else None
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
