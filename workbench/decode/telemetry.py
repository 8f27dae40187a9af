"""Decoding telemetry: the trace variables decoders write (`record=["decoding"]`) and the summaries read from them.

Per verify pass (the `forward` axis; other passes hold missing values): how many draft tokens it checked, how many
the target kept, whether a bonus token followed a fully kept draft, and the seconds spent drafting before it and
committing / rolling back after it (the verify pass's own time is `forward_seconds`).
Per emitted token (the `step` axis): where it came from, its draft and target probabilities and the acceptance
probability min(1, p/q); for adaptive decoders the decision taken at the step and the next-token varentropy.

    acceptance(trace)      mean accepted length, acceptance rate, per-position acceptance, histogram, goodput
    acceptance_line(run)   the same in one line, for the CLI
"""

from __future__ import annotations

from typing import Any

import numpy as np

from workbench.trace import schema

schema.option("decoding", "speculative and adaptive decoding: per verify pass the drafted, accepted and bonus counts "
                          "and the draft / commit seconds; per token its origin (accepted draft, resampled, bonus), "
                          "draft and target probabilities and min(1, p/q); adaptive decoders' decision per step")

SOURCE = "the decoder's step (workbench.decode)"
schema.declare("verify_drafted", ("forward",), "tokens", "draft tokens this verify pass checked, the most it "
               "could keep (a candidate tree: its depth; -1: not a verify pass)", "decoding", SOURCE, "int64")
schema.declare("verify_candidates", ("forward",), "tokens", "candidate tokens this verify pass checked: the "
               "draft's length, or a candidate tree's node count (medusa)", "decoding", SOURCE, "int64")
schema.declare("verify_accepted", ("forward",), "tokens", "draft tokens the target kept in this verify pass",
               "decoding", SOURCE, "int64")
schema.declare("verify_bonus", ("forward",), "tokens", "1 when the whole draft was kept and the token after it "
               "came from the target's next distribution (the bonus token), else 0", "decoding", SOURCE, "int64")
schema.declare("draft_seconds", ("forward",), "seconds", "wall time spent drafting before this verify pass",
               "decoding", SOURCE, "float64")
schema.declare("commit_seconds", ("forward",), "seconds", "wall time of the commit and rollback after this verify "
               "pass (the draft's session included)", "decoding", SOURCE, "float64")
schema.declare("token_origin", ("step",), "", "where the token came from: 'accepted' (a draft token the target "
               "kept), 'resampled' (the target's choice at the first rejected draft position), 'bonus' (the target's "
               "token after a fully kept draft) or 'plain' (no draft)", "decoding", SOURCE, "str")
schema.declare("draft_prob", ("step",), "probability", "q(x): the draft distribution's probability of the token "
               "(a deterministic draft: 1 for the tokens kept, 0 for the resampled one; NaN: not drafted)", "decoding", SOURCE)
schema.declare("target_prob", ("step",), "probability", "p(x): the target distribution's probability of the token "
               "(the decoder's distribution over the target's logits)", "decoding", SOURCE)
schema.declare("accept_prob", ("step",), "probability", "min(1, p(x)/q(x)) for an accepted draft token: the "
               "chance rejection sampling keeps it. Decoders that accept by another rule (greedy mode: argmax "
               "equality; medusa's typical acceptance; BiLD's rollback threshold) record the same ratio for "
               "comparison, not their rule's chance (NaN: not an accepted draft)", "decoding", SOURCE)
schema.declare("decode_decision", ("step",), "", "an adaptive decoder's decision at this step (AdaDec: greedy or "
               "lookahead; entropix: its regime; BiLD: little or big)", "decoding", SOURCE, "str")
schema.declare("varentropy", ("step",), "nats^2", "variance of the surprisal -log p under the next-token "
               "distribution (entropix)", "decoding", SOURCE)

ORIGINS = ("accepted", "resampled", "bonus", "plain")


def verify_passes(trace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(drafted, accepted, bonus) per verify pass, in order, from a one-sequence trace."""
    drafted = trace["verify_drafted"].values.reshape(-1)
    keep = drafted >= 0
    return (drafted[keep], trace["verify_accepted"].values.reshape(-1)[keep],
            trace["verify_bonus"].values.reshape(-1)[keep])


def acceptance(trace) -> dict[str, Any] | None:
    """Speculative decoding's summary from a trace recorded with "decoding" (None: no verify pass recorded).

    mean_accepted_length  1 + accepted / verify passes: tokens per verify pass, the target's own token counted (as
                          vLLM reports it)
    acceptance_rate       accepted / drafted
    per_position          P(draft token i kept | the draft reached i and tokens 0..i-1 were kept), i = 0, 1, ...
    histogram             verify passes that kept 0, 1, 2, ... draft tokens
    goodput_tokens_per_s  tokens emitted by the verify steps per second of those steps (SmartSpec's goodput:
                          accepted drafts plus the target's token, per second of draft + verify + commit)
    speedup_vs_greedy     the greedy time those tokens would take, estimated from this run's plain decode passes
                          (median), over the time they took (NaN: the run had no plain decode pass). Drafters
                          run one plain decode step before drafting, so a run with drafts on every later step
                          has one plain pass and the estimate rests on that one measurement"""
    if "sequence" in trace.dims:
        trace = trace.isel(sequence=0)
    if "verify_drafted" not in trace:
        return None
    drafted, accepted, bonus = verify_passes(trace)
    if not drafted.size:
        return None
    longest = int(drafted.max())
    reached = np.array([(drafted > i).sum() for i in range(longest)])
    kept = np.array([(accepted > i).sum() for i in range(longest)])
    tried = np.array([((drafted > i) & (accepted >= i)).sum() for i in range(longest)])
    per_position = np.where(tried > 0, kept / np.maximum(tried, 1), np.nan)
    verify = trace["verify_drafted"].values >= 0
    forward_seconds = trace["forward_seconds"].values
    spent = (forward_seconds[verify].sum() + np.nansum(trace["draft_seconds"].values[verify])
             + np.nansum(trace["commit_seconds"].values[verify]))
    emitted = int(accepted.sum() + drafted.size)
    decode = trace["forward_phase"].values == "decode"
    greedy_step = float(np.median(forward_seconds[decode])) if decode.any() else float("nan")
    return {"verify_passes": int(drafted.size), "drafted": int(drafted.sum()), "accepted": int(accepted.sum()),
            "bonus": int(bonus.sum()), "mean_accepted_length": 1 + float(accepted.sum()) / drafted.size,
            "acceptance_rate": float(accepted.sum()) / max(int(drafted.sum()), 1),
            "per_position": [round(float(v), 4) for v in per_position], "reached": reached.tolist(),
            "histogram": np.bincount(accepted, minlength=longest + 1).tolist(),
            "goodput_tokens_per_s": float(emitted / spent) if spent > 0 else float("nan"),
            "speedup_vs_greedy": float(emitted * greedy_step / spent) if spent > 0 else float("nan")}


def acceptance_line(run) -> str:
    summary = acceptance(run.trace)
    if summary is None:
        return "acceptance: no verify pass recorded (a speculative decoder with record=['decoding'])"
    per_position = ", ".join(f"{v:.2f}" for v in summary["per_position"][:6])
    return (f"acceptance: mean accepted length {summary['mean_accepted_length']:.2f} over "
            f"{summary['verify_passes']} verify passes, rate {summary['acceptance_rate']:.2f} "
            f"(by position {per_position}), goodput {summary['goodput_tokens_per_s']:.1f} tok/s, "
            f"{summary['speedup_vs_greedy']:.2f}x this run's greedy estimate")


def surprisal_moments(logits) -> tuple[float, float]:
    """(entropy, varentropy) in nats of softmax(logits) for (vocab,) float logits: E[-log p] and Var[-log p]."""
    import torch

    log_p = torch.log_softmax(logits.float(), -1)
    p = log_p.exp()
    entropy = -(p * log_p).sum()
    varentropy = (p * (log_p + entropy) ** 2).sum()
    return float(entropy), float(varentropy)
