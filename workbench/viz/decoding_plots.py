"""Pictures of how a run was decoded (record "decoding"): speculative decoders' acceptance by draft position against
the i.i.d. model, the accepted-length histogram, the time split per phase, and adaptive decoders' decisions.

    acceptance_by_position(trace)   P(draft token i kept), measured (bars) and a^(i+1) (line)
    accepted_lengths(trace)         verify passes by how many draft tokens they kept
    phase_times(trace)              seconds spent in each phase of the run (prefill, decode, draft, verify, commit)
    decisions(trace)                an adaptive decoder's decision per token, over entropy (and varentropy)
    decoding(trace)                 the plots the trace has the records for, side by side
"""

from __future__ import annotations

from typing import Any

import holoviews as hv
import numpy as np
import pandas as pd

from workbench.decode.telemetry import acceptance
from workbench.errors import WorkbenchError
from workbench.viz import style
from workbench.viz.backend import ensure_bokeh
from workbench.viz.inputs import as_trace, require, require_steps, step_tokens
from workbench.viz.stream import token_stream


PHASES = ("prefill", "decode", "draft", "verify", "commit", "rollout", "append")


def _acceptance(trace) -> dict:
    require(trace, "verify_drafted", purpose="speculative decoding's acceptance")
    summary = acceptance(trace)
    if summary is None:
        raise WorkbenchError("the trace has no verify pass: the run's decoder drafted nothing (use a speculative "
                             "decoder: speculative, prompt_lookup, layer_skip, cache_draft, ...)")
    return summary


def acceptance_by_position(trace: Any) -> hv.Overlay:
    """For each draft position i: the share of verify passes drafting that far whose tokens 0..i were all kept
    (bars), against a^(i+1), the i.i.d. model where each draft token is kept with the run's per-token rate a."""
    ensure_bokeh()
    trace = as_trace(trace)
    summary = _acceptance(trace)
    drafted = trace["verify_drafted"].values.reshape(-1)
    kept = trace["verify_accepted"].values.reshape(-1)[drafted >= 0]
    drafted = drafted[drafted >= 0]
    positions = np.arange(len(summary["per_position"]))
    measured = [float((kept[drafted > i] > i).mean()) for i in positions]
    tried = sum(((drafted > i) & (kept >= i)).sum() for i in positions)
    rate = summary["accepted"] / tried if tried else 0.0  # the i.i.d. model's maximum-likelihood rate
    bars = hv.Bars(pd.DataFrame({"position": positions, "kept": measured}), "position", "kept",
                   label="measured").opts(backend="bokeh", color=style.ORIGIN_COLORS["accepted"],
                                          tools=["hover"])
    curve = hv.Curve((positions, rate ** (positions + 1.0)), "position", "kept", label=f"i.i.d. a^(i+1), a={rate:.2f}")
    return (bars * curve.opts(backend="bokeh", color="black", line_dash="dashed")).opts(
        backend="bokeh", title=f"draft tokens kept by position (mean accepted length "
                               f"{summary['mean_accepted_length']:.2f})", width=style.WIDTH // 2 + 40,
        height=style.HEIGHT, ylim=(0, 1.05), legend_position="top_right", xlabel="draft position i",
        ylabel="P(tokens 0..i kept)")


def accepted_lengths(trace: Any) -> hv.Bars:
    """The accepted-length histogram: verify passes by how many draft tokens they kept."""
    ensure_bokeh()
    trace = as_trace(trace)
    summary = _acceptance(trace)
    counts = summary["histogram"]
    return hv.Bars(pd.DataFrame({"kept": np.arange(len(counts)), "passes": counts}), "kept", "passes").opts(
        backend="bokeh", title=f"verify passes by draft tokens kept ({summary['verify_passes']} passes)",
        color=style.ORIGIN_COLORS["accepted"], width=style.WIDTH // 2 + 40, height=style.HEIGHT, tools=["hover"],
        xlabel="draft tokens kept")


def phase_times(trace: Any) -> hv.Bars:
    """Seconds the run spent in each phase: forward passes by phase (prefill, decode, verify, rollout, append) and
    the drafting and commit time recorded around verify passes."""
    ensure_bokeh()
    trace = as_trace(trace)
    require(trace, "forward_seconds", purpose="the time per phase")
    phases = trace["forward_phase"].values.reshape(-1).astype(str)
    seconds = trace["forward_seconds"].values.reshape(-1)
    totals = {phase: float(seconds[phases == phase].sum()) for phase in dict.fromkeys(phases)}
    for name, phase in (("draft_seconds", "draft"), ("commit_seconds", "commit")):
        if name in trace:
            totals[phase] = float(np.nansum(trace[name].values))
    order = [p for p in PHASES if p in totals]
    frame = pd.DataFrame({"phase": order, "seconds": [totals[p] for p in order]})
    return hv.Bars(frame, "phase", "seconds").opts(
        backend="bokeh", title=f"time per phase ({sum(totals.values()):.2f} s)", color=style.PHASE_COLOR,
        width=style.WIDTH // 2 + 40, height=style.HEIGHT, tools=["hover"])


def decisions(trace: Any) -> hv.Overlay:
    """An adaptive decoder's decision for each token (AdaDec's greedy / look-ahead, entropix's regimes, BiLD's little
    / big model) as coloured points over next-token entropy by step; with varentropy recorded (entropix), a second
    panel places each step in the entropy x varentropy plane its regimes are cut from."""
    ensure_bokeh()
    trace = as_trace(trace)
    require(trace, "decode_decision", purpose="the decoder's decisions")
    require_steps(trace, "the decoder's decisions")
    frame = pd.DataFrame({"step": trace["step"].values, "decision": trace["decode_decision"].values.reshape(-1)
                          .astype(str), "token": step_tokens(trace)})
    frame = frame[frame["decision"] != ""]
    has_entropy = "entropy" in trace
    frame["entropy"] = trace["entropy"].values.reshape(-1)[frame.index] if has_entropy else 0.0
    y = "entropy" if has_entropy else "decision"
    points = [hv.Scatter(group, "step", [y, "decision", "token"], label=name).opts(
        backend="bokeh", size=8, tools=["hover"]) for name, group in frame.groupby("decision", sort=True)]
    strip = hv.Overlay(points).opts(backend="bokeh", title="decision per token" + (" over next-token entropy" if
                                    has_entropy else " (record 'entropy' to place it)"), width=style.WIDTH,
                                    height=style.HEIGHT, legend_position="right", ylabel=y)
    if "varentropy" not in trace or not has_entropy:
        return strip
    frame["varentropy"] = trace["varentropy"].values.reshape(-1)[frame.index]
    plane = hv.Overlay([hv.Scatter(group, "entropy", ["varentropy", "decision", "token"], label=name).opts(
        backend="bokeh", size=8, tools=["hover"]) for name, group in frame.groupby("decision", sort=True)]).opts(
        backend="bokeh", title="entropy x varentropy", width=style.WIDTH // 2 + 80, height=style.HEIGHT,
        show_legend=False)
    return strip + plane


def decoding(trace: Any) -> hv.Layout:
    """Every decoding plot the trace has the records for: the token stream by origin, acceptance by position, the
    accepted-length histogram and the time per phase for speculative decoders; the decisions of adaptive ones."""
    ensure_bokeh()
    trace = as_trace(trace)
    plots = []
    if "token_origin" in trace:
        plots.append(token_stream(trace, color_by="origin"))
    if "verify_drafted" in trace and acceptance(trace) is not None:
        plots += [acceptance_by_position(trace), accepted_lengths(trace)]
    if "decode_decision" in trace:
        plots.append(decisions(trace))
    if not plots:
        raise WorkbenchError("the trace has no decoding telemetry: record 'decoding' with a speculative or adaptive "
                             "decoder (wb.generate(..., decoder='prompt_lookup', record=['decoding']))")
    plots.append(phase_times(trace))
    return hv.Layout(plots).cols(2).opts(backend="bokeh", shared_axes=False)
