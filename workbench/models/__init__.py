"""Loading models: the embedded SmolLM2, any Hugging Face causal LM, and tiny random models for tests."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch

from workbench.errors import ModelLoadError
from workbench.models.devices import resolve_device, resolve_dtype
from workbench.models.embedded import EMBEDDED_ALIASES, EMBEDDED_NAME, cache_root, ensure_converted
from workbench.models.model import Model
from workbench.models.moefy import moefy
from workbench.models.tiny import FAMILIES as TINY_FAMILIES
from workbench.models.tiny import MOE_FAMILIES, build_tiny, byte_tokenizer

__all__ = ["Model", "load", "moefy", "tiny", "wrap", "cache_root", "TINY_FAMILIES", "MOE_FAMILIES", "EMBEDDED_NAME"]


def load(name: str | None = None, *, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None) -> Model:
    """Load a causal language model with its tokenizer.

    name   -- None (or "smollm2") for the embedded SmolLM2-135M-Instruct; a Hugging Face id ("org/name") found
              in the local HF cache or online; a local directory; a local .gguf file; or "tiny:<family>" for
              `tiny(family)` (CPU, float32 unless device/dtype say otherwise).
    device -- default CUDA when available, else CPU.
    dtype  -- default bfloat16 on CUDA, float32 on CPU.
    """
    if name is not None and name.startswith("tiny:"):
        return tiny(name.split(":", 1)[1], device=device or "cpu", dtype=dtype or "float32")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    started = time.perf_counter()
    if name is None or name in EMBEDDED_ALIASES:
        source, gguf_file, label = ensure_converted(), None, EMBEDDED_NAME
    else:
        source, gguf_file, label = _locate(name), None, name
        if str(source).endswith(".gguf"):
            source, gguf_file = Path(source).parent, Path(source).name
    hf, tokenizer = _from_pretrained(source, gguf_file, dtype, label)
    hf.to(device).eval()
    return Model(hf, tokenizer, label, info={"source": str(source), "load_seconds": time.perf_counter() - started})


def tiny(family: str = "llama", *, seed: int = 0, device: str | torch.device | None = "cpu",
         dtype: str | torch.dtype | None = "float32", **config_overrides) -> Model:
    """A tiny random model of `family` (llama, qwen3, mixtral, qwen3_moe, gemma2) with a byte tokenizer.

    Same seed and overrides give the same weights. `config_overrides` go to the transformers config
    (e.g. num_hidden_layers=3)."""
    device = resolve_device(device)
    hf = build_tiny(family, seed=seed, **config_overrides).to(device=device, dtype=resolve_dtype(dtype, device))
    return Model(hf, byte_tokenizer(), f"tiny-{family}", info={"seed": seed, "family": family})


def wrap(hf_model, tokenizer, name: str | None = None) -> Model:
    """Use a model and tokenizer you loaded yourself."""
    if not hasattr(hf_model, "generate") or not hasattr(hf_model, "config"):
        raise ModelLoadError(f"{type(hf_model).__name__} is not a transformers causal LM")
    return Model(hf_model.eval(), tokenizer, name or hf_model.config._name_or_path or type(hf_model).__name__)


def _locate(name: str):
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name.endswith(".gguf") or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"no model at {name!r}: the path does not exist")
    if name.count("/") != 1:
        raise ModelLoadError(f"unknown model {name!r}: give a local path, a Hugging Face id like 'org/name', "
                             f"or None for the embedded {EMBEDDED_NAME}")
    return name


def _from_pretrained(source, gguf_file, dtype, label):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        config = AutoConfig.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load model {label!r}: not a local model directory and not in the local "
                             f"Hugging Face cache (no hub access?) ({_first_line(e)})") from e
    try:
        with _quiet_progress():  # a sub-second load needs no bar; the GGUF conversion prints its own message
            hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise ModelLoadError(f"{label!r} is a {type(config).__name__}, not a causal language model; "
                                 "workbench needs a model that AutoModelForCausalLM can load") from e
        raise ModelLoadError(f"cannot load model {label!r}: {_first_line(e)}") from e
    except OSError as e:
        raise ModelLoadError(f"cannot load model {label!r}: {_first_line(e)}") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model {label!r} loaded but its tokenizer did not: {_first_line(e)}") from e
    return hf, tokenizer


@contextmanager
def _quiet_progress():
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
