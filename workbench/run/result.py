"""`Run`: what one generation produced, and `StepEvent`: what the stream callback receives each step."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from workbench.decode.telemetry import acceptance
from workbench.trace import save_trace


@dataclass
class StepEvent:
    """One generated token, handed to `generate(..., stream=callback)` as soon as it is chosen."""

    step: int
    token_id: int
    token: str  # the token on its own
    text: str  # the text this token added to the output ("" when it only completes a character later)
    records: dict[str, Any]  # this step's recorded values (entropy, attention_entropy (layer, head), ...)
    finished: bool  # True on the last step


@dataclass
class Run:
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    prefill_seconds: float
    decode_seconds: list[float]  # one per decoding step (a speculative step gives several tokens)
    peak_cache_bytes: int  # the most at any moment: the prompt's keys and values before a policy compressed them
    held_cache_bytes: int  # the most held after a forward pass (what a compressing policy keeps)
    finish_reason: str  # "eos", "length" or "empty" (max_new_tokens=0)
    trace: xr.Dataset
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return self.prefill_seconds + sum(self.decode_seconds)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of generation, prefill included (what `model.generate` users see)."""
        return len(self.token_ids) / self.total_seconds if self.total_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decoding steps alone (the first token comes from the prefill; a step may give
        several tokens, as speculative decoders' do)."""
        seconds = sum(self.decode_seconds)
        return (len(self.token_ids) - 1) / seconds if seconds > 0 and self.decode_seconds else 0.0

    @property
    def tokens(self) -> list[str]:
        return [str(t) for t in self.trace["token"].values.reshape(-1)]

    @property
    def steps(self):
        """The trace of this run's one sequence, without the `sequence` dimension (handy for plain arrays)."""
        return self.trace.isel(sequence=0)

    def save(self, path: str | Path) -> Path:
        """Write the trace (with the run's configuration in its attributes) to a netCDF file."""
        return save_trace(self.trace, path)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary: text, speed, memory, and entropy statistics where recorded."""
        out: dict[str, Any] = {
            "text": self.text,
            "new_tokens": len(self.token_ids),
            "prompt_tokens": len(self.prompt_ids),
            "finish_reason": self.finish_reason,
            "prefill_seconds": round(self.prefill_seconds, 4),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "peak_cache_bytes": self.peak_cache_bytes,
            "held_cache_bytes": self.held_cache_bytes,
            "config": self.config,
        }
        trace = self.steps
        if "entropy" in trace and trace.sizes["step"]:
            entropy = trace["entropy"].values  # missing for the later tokens of a multi-token step
            attention = trace["attention_entropy"].mean(("step", "head")).values
            out["entropy"] = {"mean": float(np.nanmean(entropy)), "max": float(np.nanmax(entropy)),
                              "argmax_step": int(np.nanargmax(entropy)),
                              "attention_mean_by_layer": [round(float(v), 4) for v in attention]}
        if "kl_vs_dense" in trace and trace.sizes["step"]:
            out["fidelity"] = fidelity_summary(trace)
        accepted = acceptance(trace)
        if accepted is not None:
            out["acceptance"] = accepted
        return out

    def __repr__(self) -> str:
        shown = self.text if len(self.text) < 60 else self.text[:57] + "..."
        return (f"Run({len(self.token_ids)} tokens, {self.tokens_per_s:.1f} tok/s, "
                f"finish={self.finish_reason!r}, text={shown!r})")


def entropy_summary_line(run: Run) -> str:
    trace = run.steps
    if "entropy" not in trace or not trace.sizes["step"]:
        return "entropy: not recorded (record=['entropy'])"
    entropy = trace["entropy"].values  # missing for the later tokens of a multi-token step
    layer_means = trace["attention_entropy"].mean(("step", "head")).values
    top = int(np.nanargmax(entropy))
    return (f"next-token entropy: mean {np.nanmean(entropy):.3f} nats, max {entropy[top]:.3f} at step "
            f"{top} ({run.tokens[top]!r}); attention entropy by layer: "
            f"lowest layer {int(layer_means.argmin())} ({layer_means.min():.2f}), "
            f"highest layer {int(layer_means.argmax())} ({layer_means.max():.2f})")


def fidelity_summary(trace: xr.Dataset) -> dict[str, float]:
    """Mean/min attention recall, mean output error and mean/max KL against the dense run."""
    if "sequence" in trace.dims:
        trace = trace.isel(sequence=0)
    recall = trace["attention_recall"].values
    finite = recall[np.isfinite(recall)]
    kl = trace["kl_vs_dense"].values
    return {"recall_mean": float(finite.mean()) if finite.size else float("nan"),
            "recall_min": float(finite.min()) if finite.size else float("nan"),
            "output_error_mean": float(trace["attention_output_error"].values.mean()),
            "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "cache_dropped_mass_mean": float(trace["cache_dropped_mass"].values.mean())}


def fidelity_summary_line(run: Run) -> str:
    if "kl_vs_dense" not in run.trace or not run.trace.sizes["step"]:
        return "fidelity: not recorded (record=['fidelity'])"
    f = fidelity_summary(run.steps)
    return (f"fidelity vs dense: attention recall mean {f['recall_mean']:.3f} (min {f['recall_min']:.3f}), "
            f"output error {f['output_error_mean']:.3f}, KL mean {f['kl_mean']:.4f} / max {f['kl_max']:.4f} nats, "
            f"dense attention on evicted positions {f['cache_dropped_mass_mean']:.3f}")
