"""`StepContext`: what a decoder's `step(ctx)` is handed (see workbench.decode.base for the contract)."""

from __future__ import annotations

import torch

from workbench.kernels import softmax_entropy


class StepContext:
    """One step of a run: the session, the next-token logits (fed on first use), their entropy (computed once and
    shared with the recorder), the run's random generator and a way to record telemetry."""

    def __init__(self, session, rng: torch.Generator, pending: list[int], logits: torch.Tensor | None, recorder,
                 tokens: list[int] | None = None, state: dict | None = None, remaining: int | None = None,
                 stop_ids: frozenset[int] | set[int] = frozenset()):
        self.session = session
        self.rng = rng
        self.tokens = tokens if tokens is not None else []  # the sequence so far: prompt, then every chosen token
        self.state = state if state is not None else {}  # the run's own: kept from step to step (a draft's session)
        self.pending = list(pending)  # chosen but not fed yet
        self.remaining = remaining  # tokens the run may still emit, this step's included (None: unbounded)
        self.stop_ids = frozenset(stop_ids)  # end-of-sequence ids that stop the run (empty with ignore_eos)
        self.recorder = recorder
        self._logits = logits
        self._entropy = None
        self.logits_forward = session.forwards - 1 if logits is not None else None  # the pass that gave them

    @property
    def logits(self) -> torch.Tensor:
        """Float32 (vocab,): the next-token logits after everything chosen so far (feeds `pending` if needed)."""
        if self._logits is None:
            self._logits = self.session.feed(self.pending, "decode")[-1]
            self.logits_forward = self.session.forwards - 1
            self.pending = []
        return self._logits

    @property
    def entropy(self) -> torch.Tensor:
        """The entropy (nats, 0-d float32 tensor) of softmax(logits), by the fused Triton kernel on GPU."""
        if self._entropy is None:
            self._entropy = softmax_entropy(self.logits)[1]
        return self._entropy

    def take_pending(self) -> list[int]:
        """The pending tokens, which the caller now feeds itself (e.g. ahead of a draft, in one verify pass); it
        then says which logits chose its first token with `chose_from`."""
        pending, self.pending = self.pending, []
        return pending

    def chose_from(self, logits: torch.Tensor) -> None:
        """The (vocab,) logits the step's first token was drawn from, from the session's latest pass (for a decoder
        that fed the pending tokens itself; what the trace records for the step)."""
        self._logits, self._entropy = logits, None
        self.logits_forward = self.session.forwards - 1

    @property
    def logits_seen(self) -> bool:
        """Whether the step's logits are known without feeding anything more."""
        return self._logits is not None

    def record(self, name: str, value) -> None:
        """Record a declared trace variable (workbench.trace.schema); ignored when not recorded. A `step` variable
        takes one value per token the step returns, in order (fewer: the rest are missing); a `forward` variable
        describes the session's latest pass."""
        if self.recorder is not None:
            self.recorder.record(name, value)

    def recording(self, name: str) -> bool:
        """Whether variable `name` is recorded in this run (to skip computing what nobody keeps)."""
        return self.recorder is not None and name in self.recorder.enabled
