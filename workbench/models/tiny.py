"""Tiny random models built from transformers configs (fixed seed), for fast tests of every model family.

They share a byte-level tokenizer built here, so they need no download and no embedded package.
"""

from __future__ import annotations

import torch

from workbench.errors import ModelLoadError

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB_SIZE = 320  # 3 special tokens + 256 bytes, rounded up

# Shared shape: GQA with 4 query heads over 2 KV heads, head_dim 64 (a size the Triton kernels support).
_COMMON = dict(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
               initializer_range=0.2)

FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen3": ("Qwen3Config", {}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None}),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                                     "decoder_sparse_step": 1, "mlp_only_layers": []}),
    # a sliding-window layer then a full one, and logit softcapping in attention and at the output
    "gemma2": ("Gemma2Config", {"sliding_window": 24, "attn_logit_softcapping": 20.0, "final_logit_softcapping": 30.0,
                                "query_pre_attn_scalar": 64, "hidden_activation": "gelu_pytorch_tanh"}),
}
MOE_FAMILIES = ("mixtral", "qwen3_moe")


def byte_tokenizer():
    """A byte-level tokenizer (every UTF-8 byte is a token) with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(alphabet)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None, additional_special_tokens=None,
                                   chat_template=CHAT_TEMPLATE, extra_special_tokens=SPECIAL_TOKENS)


def tiny_config(family: str, **overrides):
    if family not in FAMILIES:
        raise ModelLoadError(f"unknown tiny family {family!r}; available: {', '.join(FAMILIES)}")
    import transformers

    class_name, extra = FAMILIES[family]
    return getattr(transformers, class_name)(**{**_COMMON, **extra, **overrides})


def build_tiny(family: str, seed: int = 0, **overrides):
    """A randomly initialised `*ForCausalLM` of `family`, identical for the same seed and overrides."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model.eval()
