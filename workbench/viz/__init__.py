"""Plots of a run's trace: HoloViews objects (bokeh backend) that render in JupyterLab, save as standalone HTML
(bokeh's JavaScript inlined, works offline) or as PNG (through matplotlib).

    import workbench as wb
    wb.viz.setup()                      # once per notebook: hv.extension("bokeh") with inline resources
    run = wb.generate(model, "...", record=["entropy", "cache"])
    wb.viz.entropy(run.trace)           # token stream, entropy curve, attention entropy maps
    wb.viz.cache_occupancy(run.trace, layer=0, kv_head=0)
    wb.viz.compare(run_a, run_b, labels=("full", "snapkv"))
    wb.viz.decoding(run.trace)          # speculative acceptance, time per phase, adaptive decisions
    wb.viz.expert_map(run.trace)        # MoE routing (record="routing"): each token's expert per layer
    wb.viz.logit_lens(run.trace)        # record="layers": at which layer the model already knows its token
    wb.viz.cache_parts([run_a, run_b])  # a quantized cache's bytes: codes, scales, zeros, residual
    wb.viz.save_html(plot, "plot.html"); wb.viz.save_png(plot, "plot.png")

Every plot takes a Run or its trace, and fails with a WorkbenchError naming the `record=` choice it needs when the
trace lacks it. Importing this package imports HoloViews and bokeh (about two seconds), so `import workbench`
does not: `wb.viz` is loaded on first use.
"""

from workbench.viz.attention_plots import attention_pattern
from workbench.viz.backend import setup
from workbench.viz.cache_plots import cache_bytes, cache_occupancy, cache_states
from workbench.viz.comparison import compare, divergence_step
from workbench.viz.decoding_plots import (acceptance_by_position, accepted_lengths, decisions, decoding,
                                          phase_times)
from workbench.viz.entropy_plots import entropy_curve, entropy_heatmap, head_entropy_map
from workbench.viz.export import save_html, save_png
from workbench.viz.fidelity_plots import fidelity, fidelity_variables
from workbench.viz.layer_plots import layer_similarity, logit_lens
from workbench.viz.overview import entropy, overview, supported_plots
from workbench.viz.quant_plots import cache_parts, quant_error
from workbench.viz.routing_plots import (cache_hit_rates, expert_load, expert_map, prediction_quality,
                                         router_entropy, routing_consistency)
from workbench.viz.stream import token_stream

__all__ = ["acceptance_by_position", "accepted_lengths", "attention_pattern", "cache_bytes", "cache_hit_rates",
           "cache_parts", "quant_error",
           "cache_occupancy", "cache_states", "compare", "decisions", "decoding", "divergence_step", "entropy",
           "entropy_curve", "entropy_heatmap", "expert_load", "expert_map", "fidelity", "fidelity_variables",
           "head_entropy_map", "layer_similarity", "logit_lens", "overview", "phase_times", "prediction_quality", "router_entropy",
           "routing_consistency", "save_html", "save_png", "setup", "supported_plots", "token_stream"]
