"""`CacheSession`: feed tokens, chunk after chunk, into one cache of a policy, as workbench.generate's loop does.

Each forward pass gets explicit positions (so a cache that evicted tokens still gives every new token its true
RoPE position), the cache sees the token ids first (`see_tokens`), and everything runs inside `use_attention`,
through which eviction policies see each layer's attention and evict. A forward pass of more than one token is,
for a policy, a prefill (SnapKV-style policies compress then); one token is a decoding step.

    with CacheSession(model, wb.cache.get("snapkv", budget=128)) as session:
        logits = session.prefill(prompt_ids)         # (vocab,) for the last token
        logits = session.feed([next_id])
        session.peak_bytes, session.position

`prefill(ids, record)` with a PrefillRecord of the same ids replays that full-cache prefill into the cache instead
of running the model (exact; see workbench.eval.prefill), and falls back to a real prefill when the policy's cache
cannot be replayed (`session.replayed` says which happened).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch

from workbench import attention as attention_family
from workbench import cache as cache_family
from workbench.attention import use_attention


class CacheSession:
    def __init__(self, model, cache: Any = "full", attention: Any = "sdpa"):
        self.model = model
        self.policy = cache_family.get(cache)
        self.attention = attention_family.get(attention)
        self.kv = None
        self.position = 0  # tokens fed so far: the next token's position
        self.peak_bytes = 0  # the most the cache held after any forward pass
        self._stack: ExitStack | None = None
        self.replayed = False

    def __enter__(self) -> CacheSession:
        self.kv = self.policy.build(self.model)
        self._stack = ExitStack()
        self._stack.enter_context(torch.inference_mode())
        self._stack.enter_context(use_attention(self.model.hf, self.attention, None, self.kv))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._stack = None

    def prefill(self, ids, record=None) -> torch.Tensor:
        """The first forward pass: the prompt `ids`. With a PrefillRecord of the same ids, replay it instead."""
        if self.position:
            raise RuntimeError("prefill must be the session's first forward pass")
        ids = [int(i) for i in torch.as_tensor(ids).reshape(-1).tolist()]
        if record is not None and record.ids == ids:
            if record.replay(self.kv):
                self.replayed = True
                self.position = len(ids)
                self.peak_bytes = self.kv.nbytes()
                return record.logits
            self.__exit__(None, None, None)  # the cache is half-filled: start again with a fresh one
            self.__enter__()
        return self.feed(ids)

    def feed(self, ids, all_logits: bool = False) -> torch.Tensor:
        """Run the tokens `ids` (a list, or a tensor (n,) / (1, n)) through the model on top of the cache.
        Returns float32 logits: (vocab,) for the last token, or (n, vocab) with all_logits."""
        if self._stack is None:
            raise RuntimeError("CacheSession.feed runs only inside `with CacheSession(...) as session:`")
        device = self.model.device
        ids = torch.as_tensor(ids, dtype=torch.long, device=device).reshape(1, -1)
        n = ids.shape[1]
        positions = torch.arange(self.position, self.position + n, device=device)[None]
        keep = {} if all_logits else self.model.keep_logits(1)
        self.kv.see_tokens(ids)
        logits = self.model.hf(input_ids=ids, **{self.model.cache_keyword: self.kv}, position_ids=positions, use_cache=True,
                               **keep).logits[0].float()
        self.position += n
        self.peak_bytes = max(self.peak_bytes, self.kv.nbytes())
        return logits if all_logits else logits[-1]
