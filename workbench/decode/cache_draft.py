"""`cache_draft`: self-speculation through a compressed cache; the draft is the target model itself reading a small
KV cache, the full cache verifies (TriForce's idea, generalised to any registered cache policy).

TriForce (Sun et al., COLM 2024) observes that at long context decoding is bound by reading the KV cache, not the
weights: the same model over a cache of a few thousand retrieved entries drafts almost as well as over the full
cache and reads a fraction of the bytes. Here the draft session runs the target's weights over a cache of any
registered policy (`draft_cache`: streaming_llm, snapkv, h2o, ... at `draft_budget`) with any attention variant
(`draft_attention`: topk_retrieval reads Quest's top pages, as TriForce's retrieval cache reads top chunks). The
target's own session, with its own cache policy, verifies with the acceptance rule every drafter shares
(workbench.decode.speculative), so greedy mode gives exactly the target's greedy tokens.

The hierarchy (`tiny_model=`, TriForce's third level): a smaller model with the target's tokenizer, over a
StreamingLLM cache of `draft_budget` tokens, drafts for the compressed-cache level, which checks its tokens with
the same acceptance rule; as in TriForce's reference (Middle_Spec), the tiny model proposes `tiny_k` tokens (1
there) per check, and the check also gives the middle level's own next token. The k tokens so collected, with the
middle level's distributions as q, go to the full cache's verify pass. Greedy mode stays exactly greedy: each
level keeps only its verifier's argmax.

The draft session prefills the prompt once (its policy compresses it then) and catches up with the accepted tokens
before each draft. What it saves is real only where the cache read dominates the step (long contexts, a GPU); on
the embedded model at short context the draft costs about what a target step costs, and the figure to watch is the
acceptance (bench/decode.py reports both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from workbench import attention as attention_family
from workbench import cache as cache_family
from workbench.decode.speculative import ModelDrafting, accept, catch_up, check_same_vocabulary, loaded
from workbench.errors import ParameterError
from workbench.registry import param


@dataclass
class CacheDraft(ModelDrafting):
    name = "cache_draft"
    summary = ("Self-speculation: the target model over a compressed KV cache (any cache policy) drafts k tokens, "
               "the full cache verifies them in one pass.")
    paper = ("TriForce: Lossless Acceleration of Long Sequence Generation with Hierarchical Speculative Decoding "
             "(Sun et al., COLM 2024)")
    departs = ("the draft cache is any registered policy (TriForce: chunk retrieval by the chunk's mean key, "
               "rebuilt once per verify); the tiny level is optional (tiny_model=None: the compressed-cache level "
               "drafts alone); the middle level checks the tiny tokens with one provisional pass over the new "
               "tokens (the reference re-runs a fixed-size CUDA-graph buffer)")

    draft_cache: Any = param("streaming_llm", "the draft's cache policy: a registered name or a built policy")
    draft_budget: int = param(256, "tokens the draft's cache keeps (given to policies with a budget)", min=1)
    draft_attention: Any = param("sdpa", "the draft's attention variant (topk_retrieval: Quest's top pages)")
    tiny_model: Any = param(None, "TriForce's hierarchy: a smaller model with the target's tokenizer (a loaded "
                                  "Model or a name) that drafts for the compressed-cache level; None: no tiny level")
    tiny_k: int = param(1, "tokens the tiny model proposes per check by the compressed-cache level (TriForce: 1)",
                        min=1)

    def validate(self) -> None:
        super().validate()
        self.draft_policy()
        attention_family.get(self.draft_attention)

    def draft_policy(self):
        """The draft's cache policy, with `draft_budget` where the policy has a budget."""
        if not isinstance(self.draft_cache, str):
            return cache_family.get(self.draft_cache)
        if self.draft_cache not in cache_family.available():
            raise ParameterError(f"decoder 'cache_draft' parameter 'draft_cache' is {self.draft_cache!r}; choose a "
                                 f"cache policy: {', '.join(cache_family.available())}")
        names = {spec.name for spec in cache_family.registry.component_class(self.draft_cache).parameters()}
        return cache_family.get(self.draft_cache, **({"budget": self.draft_budget} if "budget" in names else {}))

    def draft_session(self, ctx):
        from workbench.run.session import Session

        session = ctx.state.get("draft_session")
        if session is None:
            session = ctx.state["draft_session"] = Session(ctx.session.model, self.draft_policy(),
                                                           self.draft_attention)
        return session

    def tiny_session(self, ctx):
        """The tiny model's session, over a StreamingLLM cache of `draft_budget` tokens (TriForce's 68M level)."""
        from workbench.run.session import Session

        session = ctx.state.get("tiny_session")
        if session is None:
            tiny = loaded(self.tiny_model, "cache_draft", "tiny_model")
            check_same_vocabulary(ctx.session.model, tiny, "tiny model", "cache_draft")
            policy = cache_family.get("streaming_llm", budget=self.draft_budget)
            session = ctx.state["tiny_session"] = Session(tiny, policy, "sdpa")
        return session

    def draft(self, ctx, pending: list[int]) -> tuple[list[int], torch.Tensor | None]:
        if self.tiny_model is None:
            return super().draft(ctx, pending)
        middle, tiny = self.draft_session(ctx), self.tiny_session(ctx)
        logits, tiny_logits = catch_up(middle, ctx.tokens), catch_up(tiny, ctx.tokens)
        tokens, probs, length = [], [], self.length(ctx)
        while len(tokens) < length:
            proposed, proposed_probs = [], []  # the tiny model's tokens, fed to its session as rollouts
            for _ in range(min(self.tiny_k, length - len(tokens))):
                proposed_probs.append(self.probabilities(tiny_logits[None])[0])
                proposed.append(self.pick(tiny_logits, proposed_probs[-1], ctx.rng))
                tiny_logits = tiny.feed([proposed[-1]], "rollout", logits="last")[-1]
            rows = torch.cat([logits[None], middle.feed(proposed, "rollout")])  # the middle level's check
            middle_probs = self.probabilities(rows)
            kept, after = accept(rows if self.greedy else middle_probs, proposed, torch.stack(proposed_probs),
                                 ctx.rng, self.greedy)
            middle.rollback(middle.position - (len(proposed) - kept))  # both keep the tokens the middle kept
            tiny.rollback(tiny.position - (len(proposed) - kept))
            tokens += proposed[:kept] + [after]
            probs += list(middle_probs[:kept + 1])  # q for the full cache's check: the middle level's p
            if len(tokens) < length:
                logits = middle.feed([after], "rollout", logits="last")[-1]
                tiny_logits = tiny.feed([after], "rollout", logits="last")[-1]
        return tokens[:length], torch.stack(probs[:length])

    def accepted(self, ctx, kept: int) -> None:
        super().accepted(ctx, kept)
        tiny = ctx.state.get("tiny_session")
        if tiny is not None:
            tiny.commit(min(kept, tiny.position - tiny.committed))
