"""`cache_draft`: self-speculation through a compressed cache; the draft is the target model itself reading a small
KV cache, the full cache verifies (TriForce's idea, generalised to any registered cache policy).

TriForce (Sun et al., COLM 2024) observes that at long context decoding is bound by reading the KV cache, not the
weights: the same model over a cache of a few thousand retrieved entries drafts almost as well as over the full
cache and reads a fraction of the bytes. Here the draft session runs the target's weights over a cache of any
registered policy (`draft_cache`: streaming_llm, snapkv, h2o, ... at `draft_budget`) with any attention variant
(`draft_attention`: topk_retrieval reads Quest's top pages, as TriForce's retrieval cache reads top chunks). The
target's own session, with its own cache policy, verifies with the acceptance rule every drafter shares
(workbench.decode.speculative), so greedy mode gives exactly the target's greedy tokens.

The draft session prefills the prompt once (its policy compresses it then) and catches up with the accepted tokens
before each draft. What it saves is real only where the cache read dominates the step (long contexts, a GPU); on
the embedded model at short context the draft costs about what a target step costs, and the figure to watch is the
acceptance (bench/decode.py reports both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from workbench import attention as attention_family
from workbench import cache as cache_family
from workbench.decode.speculative import ModelDrafting
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
               "rebuilt once per verify); no tiny-model level below the draft (TriForce's hierarchy: a 68M model "
               "over a StreamingLLM cache drafts for the retrieval-cache level)")

    draft_cache: Any = param("streaming_llm", "the draft's cache policy: a registered name or a built policy")
    draft_budget: int = param(256, "tokens the draft's cache keeps (given to policies with a budget)", min=1)
    draft_attention: Any = param("sdpa", "the draft's attention variant (topk_retrieval: Quest's top pages)")

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
