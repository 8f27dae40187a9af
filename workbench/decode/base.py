"""Decoders: how the next tokens are chosen. A decoder drives the step: `step(ctx)` returns one or more tokens.

The default `step` picks one token from `ctx.logits` with `choose`, so simple decoders (greedy, sampling) only say
how a token is drawn. Decoders that run forward passes themselves (speculative decoding verifying a draft,
look-ahead rollouts) use `ctx.session` and its phases, and may return several tokens.

The contract of `step(ctx)`:
  * `ctx.pending` holds the tokens chosen so far but not yet fed (at most the last one); reading `ctx.logits`
    feeds them as a decode pass and gives the next-token logits; a decoder may instead feed them itself (say,
    together with a draft in one verify pass);
  * it returns the new tokens; every one but the last must be fed (and committed) when it returns, the last one
    becomes the next step's `ctx.pending`.
Run state (the random generator, telemetry) lives in `ctx`, never on the component: one decoder object can
serve many runs, even at once. A decoder with a `seed` parameter seeds the run's generator (None: a fresh seed).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from workbench.registry import Component


class Decoder(Component):
    """Base of decoders. Subclasses implement `probabilities` and `choose`, or override `step`."""

    lossless: ClassVar[bool] = True  # the output distribution equals the one `probabilities` describes

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Float32 (rows, vocab): the distribution this decoder draws each row's token from."""
        raise NotImplementedError

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Long (rows,): one token for each row of float32 logits (rows, vocab)."""
        raise NotImplementedError

    def step(self, ctx) -> list[int]:
        """One step of the run: by default one token chosen from the next-token logits."""
        return [int(self.choose(ctx.logits[None], ctx.rng)[0])]
