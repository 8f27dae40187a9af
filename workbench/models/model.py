"""`Model`: a Hugging Face causal LM together with its tokenizer, as the rest of workbench expects it."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.errors import PromptError

Messages = list[dict[str, str]]


@dataclass
class Model:
    """A causal language model ready for `workbench.generate`.

    hf         -- the transformers model (any `*ForCausalLM`), in eval mode
    tokenizer  -- its tokenizer, with a chat template when the model has one
    name       -- where it came from (embedded name, hub id, local path or tiny family)
    """

    hf: Any
    tokenizer: Any
    name: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def cache_keyword(self) -> str:
        """The forward keyword that takes the KV cache: `cache` from transformers 5.2x on (`past_key_values` is
        deprecated there), `past_key_values` for models whose forward predates it."""
        return "cache" if "cache" in inspect.signature(self.hf.forward).parameters else "past_key_values"

    def keep_logits(self, n: int) -> dict[str, int]:
        """Forward kwargs asking for the logits of the last `n` positions only (`logits_to_keep`), where the
        model's forward takes it; {} otherwise (the caller slices)."""
        takes_it = "logits_to_keep" in inspect.signature(self.hf.forward).parameters
        return {"logits_to_keep": n} if takes_it else {}

    @property
    def config(self):
        return self.hf.config

    @property
    def text_config(self):
        return self.hf.config.get_text_config(decoder=True)

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.text_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        cfg = self.text_config
        return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads

    @property
    def max_positions(self) -> int | None:
        return getattr(self.text_config, "max_position_embeddings", None)

    @property
    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.hf, "generation_config", None), self.config):
            eos = getattr(source, "eos_token_id", None) if source is not None else None
            if eos is None:
                continue
            ids.update([eos] if isinstance(eos, int) else eos)
        return ids

    def encode(self, prompt: str | Messages) -> torch.Tensor:
        """Token ids (1, n) for a raw text prompt, or for chat messages through the model's chat template."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=True, return_tensors="pt")["input_ids"]
        elif isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
            if not prompt:
                raise PromptError("the chat has no messages; give at least one {'role': ..., 'content': ...}")
            bad = [m for m in prompt if "role" not in m or "content" not in m]
            if bad:
                raise PromptError(f"chat messages need 'role' and 'content' keys; got {bad[0]!r}")
            if not self.has_chat_template:
                raise PromptError(f"model {self.name!r} has no chat template; pass a plain text prompt instead")
            ids = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True,
                                                     return_tensors="pt", return_dict=True)["input_ids"]
        else:
            raise PromptError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
        return ids.to(self.device)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of token ids (a list, or a tensor of shape (n,) or (1, n))."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_strings(self, ids) -> list[str]:
        """Each token on its own, as readable text (for plot axes and trace coordinates)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        return [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]

    def __repr__(self) -> str:
        return (f"Model({self.name!r}, layers={self.num_layers}, heads={self.num_heads}, "
                f"kv_heads={self.num_kv_heads}, device={self.device}, dtype={self.dtype})")
