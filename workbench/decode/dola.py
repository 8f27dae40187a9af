"""`dola`: DoLa, decoding by contrasting the final layer with a premature one.

Each step, every candidate premature layer j gives early-exit log-probs q_j = log_softmax(head(norm(h_j))) at the
last position (h_j: transformers' hidden_states[j], 0 the embeddings' output, j after j layers; norm the model's
final norm, head its lm_head, with its final logit softcapping where it has one). The premature layer is the
candidate whose distribution has the largest Jensen-Shannon divergence from the final layer's p. Then

    eligible = {v : p(v) >= alpha * max p}          (plausibility constraint)
    score(v) = log p(v) - log q_premature(v)        on the eligible tokens, -inf elsewhere

and the argmax is chosen (after transformers' repetition penalty on the scores when repetition_penalty > 1).
Candidate layers: "low" / "high" are transformers' dola_layers buckets (for N <= 40 layers range(start, N // 2, 2)
and range(N // 2, N, 2); for deeper models range(start, 20, 2) and range(N - 20, N, 2); start is 0, or 2 (1 for a
2-layer model) when the head is tied to the embeddings, whose early exit would be trivial), or a comma-separated
list of layer indices below N.

The JSD here is the paper's, 0.5 KL(p || m) + 0.5 KL(q || m) with m = (p + q) / 2; the authors' code (and
transformers') averaged 0.5 KL(m || p) + 0.5 KL(m || q) over the vocabulary, which can pick another layer.
transformers applied the head to the raw hidden state; this applies the final norm first, as an early exit is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workbench.decode.base import Decoder
from workbench.errors import ParameterError, WorkbenchError
from workbench.registry import param


def candidate_layers(spec: str, num_layers: int, tied: bool = False) -> list[int]:
    """The candidate premature layers that `spec` ("low", "high" or "0,2,5") names in a `num_layers` model."""
    spec = spec.strip()
    if spec in ("low", "high"):
        start = 0 if not tied else 2 if num_layers > 2 else 1 if num_layers == 2 else 0
        if spec == "high":
            return list(range(num_layers // 2, num_layers, 2) if num_layers <= 40 else range(num_layers - 20,
                                                                                              num_layers, 2))
        if start == num_layers // 2:
            return [start]
        return list(range(start, num_layers // 2, 2) if num_layers <= 40 else range(start, 20, 2))
    layers = parse_layers(spec)
    beyond = [j for j in layers if j >= num_layers]
    if beyond:
        raise ParameterError(f"decoder 'dola' parameter 'dola_layers' names layer {beyond[0]}, but the model's "
                             f"premature layers are 0..{num_layers - 1} (layer {num_layers} is the final one)")
    return layers


def parse_layers(spec: str) -> list[int]:
    try:
        layers = [int(part) for part in spec.split(",")]
    except ValueError:
        raise ParameterError(f"decoder 'dola' parameter 'dola_layers' must be 'low', 'high' or comma-separated "
                             f"layer indices like '0,2,4'; got {spec!r}") from None
    if any(j < 0 for j in layers) or len(set(layers)) != len(layers):
        raise ParameterError(f"decoder 'dola' parameter 'dola_layers' needs distinct layer indices >= 0; "
                             f"got {spec!r}")
    return layers


def jensen_shannon(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """JSD (nats) between the distributions of log-probs p_log (vocab,) and each row of q_log (rows, vocab)."""
    m_log = torch.logaddexp(p_log, q_log) - math.log(2)
    kl_p = (p_log.exp() * (p_log - m_log)).sum(-1)
    kl_q = (q_log.exp() * (q_log - m_log)).sum(-1)
    return 0.5 * (kl_p + kl_q)


def select_premature(final_log: torch.Tensor, premature_log: torch.Tensor) -> int:
    """The row of premature_log (candidates, vocab) farthest from final_log (vocab,) by JSD (the first on ties)."""
    return int(jensen_shannon(final_log, premature_log).argmax())


def contrast(final_log: torch.Tensor, premature_log: torch.Tensor, alpha: float) -> torch.Tensor:
    """log p - log q on the tokens with p >= alpha * max p, -inf elsewhere (float32 (vocab,) log-probs in)."""
    eligible = final_log >= final_log.max() + math.log(alpha) if alpha > 0 else torch.ones_like(final_log, dtype=bool)
    return torch.where(eligible, final_log - premature_log, torch.tensor(-math.inf, device=final_log.device))


def early_exit(hf, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 (rows, vocab) log-probs of the model's final norm and head applied to hidden states (rows, hidden)."""
    norm = getattr(hf.get_decoder(), "norm", None)
    head = hf.get_output_embeddings()
    if norm is None or head is None:
        raise WorkbenchError(f"decoder 'dola' needs a final norm (model.norm) and an output head; "
                             f"{type(hf).__name__} lacks one")
    with torch.inference_mode():
        logits = head(norm(hidden)).float()
    cap = getattr(hf.config.get_text_config(decoder=True), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)


def repetition_penalty(scores: torch.Tensor, tokens: list[int], penalty: float) -> torch.Tensor:
    """transformers' repetition penalty on the scores of tokens already in the sequence: negative ones times
    penalty, others divided by it."""
    if penalty == 1.0 or not tokens:
        return scores
    seen = torch.tensor(sorted(set(tokens)), device=scores.device)
    picked = scores[seen]
    return scores.scatter(0, seen, torch.where(picked < 0, picked * penalty, picked / penalty))


@dataclass
class DoLa(Decoder):
    name = "dola"
    summary = "DoLa: greedy on final-layer minus premature-layer log-probs, the premature layer picked by max JSD."
    paper = ("DoLa: Decoding by Contrasting Layers Improves Factuality in Large Language Models (Chuang, Xie, Luo, "
             "Kim, Glass, He; ICLR 2024)")
    departs = ("repetition_penalty is off by default (the paper and transformers recommend 1.2 for open-ended "
               "generation)")

    lossless = False  # its own deterministic rule, not a draw from `probabilities`

    dola_layers: str = param("high", "candidate premature layers: 'low', 'high' (transformers' buckets) or "
                                     "comma-separated layer indices (0: the embeddings' output)")
    alpha: float = param(0.1, "plausibility: only tokens with p >= alpha * max p are eligible", min=0.0, max=1.0)
    repetition_penalty: float = param(1.0, "transformers' repetition penalty on the contrast scores (1: off; "
                                           "1.2 recommended)", min=1.0, max=10.0)

    def validate(self) -> None:
        if self.dola_layers.strip() not in ("low", "high"):
            parse_layers(self.dola_layers)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The final layer's distribution p (the rule contrasts it; it is not what the tokens follow)."""
        return torch.softmax(logits.float(), dim=-1)

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise WorkbenchError("decoder 'dola' chooses in step(ctx): it needs the premature layers' hidden states, "
                             "which only a session gives")

    def step(self, ctx) -> list[int]:
        session = ctx.session
        pending = ctx.take_pending()
        if pending:
            logits, hidden = session.feed(pending, "decode", hidden=True)
            ctx.chose_from(logits[-1])
        else:  # the first step: the run's prefill is done; the last prompt token's hidden states from a pass of
            hidden = last_hidden(session, ctx.tokens)  # their own
        model = session.model
        layers = candidate_layers(self.dola_layers, model.num_layers, bool(model.text_config.tie_word_embeddings))
        final = torch.log_softmax(ctx.logits.float(), dim=-1)
        premature = early_exit(model.hf, torch.stack([hidden[j][-1] for j in layers]))  # (candidates, vocab)
        chosen = select_premature(final, premature)
        ctx.state.setdefault("dola_premature_layers", []).append(layers[chosen])
        scores = contrast(final, premature[chosen], self.alpha)
        scores = repetition_penalty(scores, ctx.tokens, self.repetition_penalty)
        return [int(scores.argmax())]


def last_hidden(session, tokens: list[int]) -> tuple[torch.Tensor, ...]:
    """The hidden states of `tokens` from one prefill through a full-cache session of their own."""
    from workbench.run.session import Session

    with Session(session.model, "full", session.attention, router=session.router) as scratch:
        return scratch.feed(tokens, "prefill", logits="none", hidden=True)[1]
