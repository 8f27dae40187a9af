"""`contrastive`: contrastive search, a deterministic rule that trades model confidence against degeneration.

At each step, for the top_k candidates v of p(v | x<t):

    score(v) = (1 - alpha) * p(v) - alpha * max_j cos(h_v, h_j)

where h_v is the final layer's hidden state (after the final norm, as transformers returns it) of the candidate
appended to the sequence, and h_j runs over the hidden states of every previous token, prompt and generated. The
argmax is chosen. Each candidate is one provisional `rollout` pass of one token, rolled back at once; the hidden
states of the tokens so far are kept in the run's state (the prompt's come from one full-cache pass of its own on
the first step; each chosen token's from its candidate pass), so an evicting cache changes the candidates'
hidden states but never drops a token from the degeneration penalty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.decode.base import Decoder
from workbench.errors import WorkbenchError
from workbench.registry import param


@dataclass
class Contrastive(Decoder):
    name = "contrastive"
    summary = "Contrastive search: top-k candidates scored by probability minus similarity to the context."
    paper = ("A Contrastive Framework for Neural Text Generation (Su, Lan, Wang, Yogatama, Kong, Collier; "
             "NeurIPS 2022)")

    lossless = False  # its own deterministic rule, not a draw from `probabilities`

    penalty_alpha: float = param(0.6, "weight of the degeneration penalty (0: greedy)", min=0.0, max=1.0)
    top_k: int = param(4, "candidates scored per step (the paper uses 3 to 10)", min=1, max=100)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's next-token distribution p, which the rule reranks (it is not what the tokens follow)."""
        return torch.softmax(logits.float(), dim=-1)

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise WorkbenchError("decoder 'contrastive' chooses in step(ctx): it needs the candidates' hidden states, "
                             "which only a session gives")

    def step(self, ctx) -> list[int]:
        history = ctx.state.get("contrastive_hidden")  # (tokens so far, hidden) float32
        if history is None:
            history = prompt_hidden(ctx.session, ctx.tokens)
        probs = self.probabilities(ctx.logits)  # feeds the pending token, whose hidden state history holds
        top_probs, top_ids = probs.topk(min(self.top_k, probs.shape[-1]))
        session, mark = ctx.session, ctx.session.mark()
        candidates = []
        for token in top_ids.tolist():
            _, hidden = session.feed([token], "rollout", logits="none", hidden=True)
            session.rollback(mark)
            candidates.append(hidden[-1][-1].float())
        candidates = torch.stack(candidates)  # (k, hidden)
        similarity = torch.nn.functional.normalize(candidates, dim=-1) @ torch.nn.functional.normalize(
            history, dim=-1).T  # (k, tokens so far)
        score = (1 - self.penalty_alpha) * top_probs - self.penalty_alpha * similarity.max(dim=-1).values
        best = int(score.argmax())
        ctx.state["contrastive_hidden"] = torch.cat([history, candidates[best][None]])
        return [int(top_ids[best])]


def prompt_hidden(session, tokens: list[int]) -> torch.Tensor:
    """Float32 (len(tokens), hidden): the final layer's hidden states of `tokens`, from one prefill through a
    full-cache session of their own with the run's attention and router (the run's own prefill is already done)."""
    from workbench.run.session import Session

    with Session(session.model, "full", session.attention, router=session.router) as scratch:
        _, hidden = scratch.feed(tokens, "prefill", logits="none", hidden=True)
    return hidden[-1].float()
