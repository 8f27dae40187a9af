"""What the panel shows once a run has finished: the full plots of `workbench.viz` for its trace."""

from __future__ import annotations

from workbench.decode.telemetry import acceptance
from workbench.run import Run


def result_view(runs: list[Run]):
    """One run: its token stream coloured by entropy, its per-head attention entropy, its cache bytes and, for
    speculative or adaptive decoders, the tokens by origin, acceptance by draft position and the decisions (those
    that were recorded). Two runs (compare mode): `workbench.viz.compare` of the pair."""
    import holoviews as hv

    from workbench import viz

    if len(runs) == 2:
        return viz.compare(*runs)
    trace = runs[0].trace
    plots = [viz.token_stream(trace)]
    if "attention_entropy" in trace:
        plots.append(viz.head_entropy_map(trace))
    if "cache_bytes" in trace:
        plots.append(viz.cache_bytes(trace))
    if "token_origin" in trace:
        plots.append(viz.token_stream(trace, color_by="origin"))
    if "verify_drafted" in trace and acceptance(trace) is not None:
        plots.append(viz.acceptance_by_position(trace))
    if "decode_decision" in trace:
        plots.append(viz.decisions(trace))
    return hv.Layout(plots).cols(1)
