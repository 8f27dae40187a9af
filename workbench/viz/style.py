"""Sizes and colours shared by the plots, so every figure in a layout lines up."""

WIDTH = 640  # pixels, bokeh
HEIGHT = 300
SQUARE = 420  # layer x head maps, attention matrices

ENTROPY_CMAP = "YlOrRd"  # light for confident tokens, so black token text stays readable on it
HEATMAP_CMAP = "viridis"
ATTENTION_CMAP = "Blues"
NO_VALUE_COLOR = "#e8e8e8"  # prompt tokens and cells with nothing recorded

# cache_occupancy: one colour per state, fixed so that two plots can be compared at a glance
CACHE_STATE_COLORS = {
    "alive": "#2a9d8f",
    "evicted": "#e76f51",
    "merged": "#f4a261",
    "not yet cached": "#f1f1f1",
}

# compare: run A, run B, and the divergence mark
RUN_COLORS = ("#1f77b4", "#d62728")
DIVERGENCE_COLOR = "#555555"

# decoding: where each token came from (workbench.decode.telemetry's token_origin)
ORIGIN_COLORS = {
    "accepted": "#2a9d8f",  # a draft token the target kept
    "resampled": "#e76f51",  # the target's token where the draft was rejected
    "bonus": "#8ab17d",  # the target's token after a fully kept draft
    "plain": "#cfe3f5",  # no draft
}
PHASE_COLOR = "#6c8ebf"  # phase_times' bars
