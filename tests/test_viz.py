"""Plots built from real tiny traces: the data they show is the trace's, every axis and title is named, hover
names the token, records a plot needs are asked for by name, and exports are valid offline files."""

import re
import sys

import holoviews as hv
import numpy as np
import pytest
from bokeh.models import CategoricalColorMapper, HoverTool, Legend

import workbench as wb
from workbench import viz
from workbench.viz import style
from workbench.errors import ParameterError, WorkbenchError
from workbench.viz.inputs import readable

PROMPT = "hello\nthere"  # a newline token, shown as ↵


@pytest.fixture(scope="module")
def runs(tiny_models):
    """A: greedy with a merging cache that evicts (entropy, attention, cache); B: sampled, no attention rows."""
    model = tiny_models["llama"]
    a = wb.generate(model, PROMPT, record=["entropy", "attention", "cache"], max_new_tokens=6, ignore_eos=True,
                    cache=wb.cache.get("kvmerger", budget=8, sinks=2, window=2))
    b = wb.generate(model, PROMPT, record=["entropy", "cache"], max_new_tokens=6, ignore_eos=True,
                    decoder=wb.decode.get("sample", temperature=1.5, seed=0))
    return a, b


def tooltips(plot) -> list[tuple[str, str]]:
    """Every hover tooltip of the bokeh model the plot renders to."""
    model = hv.render(plot, backend="bokeh")
    return [tip for tool in model.select({"type": HoverTool}) for tip in tool.tooltips]


def unrecorded(trace):
    """The trace as if nothing had been recorded: tokens, positions and timings only."""
    return trace.drop_vars([name for name in trace.data_vars if name != "step_seconds"])


def plot_options(plot) -> dict:
    return hv.Store.lookup_options("bokeh", plot, "plot").kwargs


def elements(plot, kind, label=None) -> list:
    found = plot.traverse(lambda element: element, [kind])
    return [element for element in found if label is None or element.label == label]


def test_token_stream_shows_each_token_coloured_by_its_entropy(runs):
    trace = runs[0].steps
    stream = viz.token_stream(trace, prompt=True)
    generated, = elements(stream, hv.Rectangles, "generated")
    assert list(generated.dimension_values("token")) == [readable(t) for t in trace["token"].values]
    np.testing.assert_allclose(generated.dimension_values("entropy"), trace["entropy"].values, rtol=1e-6)
    assert [d.name for d in generated.vdims] == ["token", "step", "entropy"]
    assert hv.Store.lookup_options("bokeh", generated, "style").kwargs["color"] == "entropy"
    prompt, = elements(stream, hv.Rectangles, "prompt")
    assert "↵" in list(prompt.dimension_values("token"))  # the newline is visible, not a blank cell
    labels, = elements(stream, hv.Labels)
    assert len(labels) == trace.sizes["position"]
    assert plot_options(stream)["title"] == "generated tokens, coloured by next-token entropy"
    assert ("token", "@{token}") in tooltips(stream) and ("prompt token", "@{token}") in tooltips(stream)


def test_token_stream_without_entropy_says_how_to_get_it(runs):
    stream = viz.token_stream(runs[0].trace.drop_vars(["entropy"]))
    assert "record 'entropy'" in plot_options(stream)["title"]


def test_entropy_heatmap_is_the_recorded_attention_entropy(runs):
    trace = runs[0].steps
    mean = viz.entropy_heatmap(trace)
    assert [d.name for d in mean.kdims] == ["step", "layer"]
    assert [d.name for d in mean.vdims] == ["attention_entropy", "token"]
    expected = trace["attention_entropy"].mean("head").transpose("step", "layer").values.ravel()
    np.testing.assert_allclose(mean.dimension_values("attention_entropy"), expected, rtol=1e-6)
    one = viz.entropy_heatmap(trace, head=2)
    np.testing.assert_allclose(one.dimension_values("attention_entropy"),
                               trace["attention_entropy"].sel(head=2).values.ravel(), rtol=1e-6)
    options = plot_options(one)
    assert options["title"] == "attention entropy by step and layer (head 2)"
    assert (options["xlabel"], options["ylabel"]) == ("step (generated token)", "layer")
    steps = one.dimension_values("step").astype(int)
    assert list(one.dimension_values("token")) == [readable(trace["token"].values[s]) for s in steps]
    assert ("token", "@{token}") in tooltips(one)


def test_head_entropy_map_over_the_prompt_or_one_step(runs):
    trace = runs[0].steps
    prompt = viz.head_entropy_map(trace)
    assert [d.name for d in prompt.kdims] == ["head", "layer"]
    expected = trace["prompt_attention_entropy"].mean("query").transpose("layer", "head").values.ravel()
    np.testing.assert_allclose(prompt.dimension_values("attention_entropy"), expected, rtol=1e-6)
    step = viz.head_entropy_map(trace, step=-1)  # negative counts from the end
    last = trace.sizes["step"] - 1
    np.testing.assert_allclose(step.dimension_values("attention_entropy"),
                               trace["attention_entropy"].sel(step=last).values.ravel(), rtol=1e-6)
    assert f"step {last}" in plot_options(step)["title"]
    assert set(step.dimension_values("token")) == {readable(trace["token"].values[last])}
    assert ("token", "@{token}") in tooltips(step)


def test_entropy_curve_is_next_token_entropy(runs):
    trace = runs[0].steps
    curve = viz.entropy_curve(trace)
    np.testing.assert_allclose(curve.dimension_values("entropy"), trace["entropy"].values, rtol=1e-6)
    assert plot_options(curve)["ylabel"] == "entropy (nats)"
    assert ("token", "@{token}") in tooltips(curve)


def test_prompt_attention_matrix_has_tokens_on_both_axes(runs):
    trace = runs[0].steps
    pattern = viz.attention_pattern(trace, layer=1, head=3)
    assert [d.name for d in pattern.kdims] == ["key", "query"]
    n_prompt = int(trace["is_prompt"].sum())
    matrix = trace["prompt_attention"].sel(attn_layer=1, attn_head=3).values[:, :n_prompt]
    keys, queries = pattern.dimension_values("key").astype(int), pattern.dimension_values("query").astype(int)
    assert (keys <= queries).all() and len(keys) == n_prompt * (n_prompt + 1) // 2  # the causal triangle
    np.testing.assert_allclose(pattern.dimension_values("attention"), matrix[queries, keys], rtol=1e-6)
    options = plot_options(pattern)
    tokens = [readable(t) for t in trace["position_token"].values[:n_prompt]]
    assert options["xticks"] == list(enumerate(tokens)) == options["yticks"]
    assert (options["xlabel"], options["ylabel"]) == ("key (position)", "query (position)")
    assert ("query", "@{query} @{query_token}") in tooltips(pattern)


def test_decode_rows_are_over_positions_even_after_eviction(runs):
    trace = runs[0].steps
    row = viz.attention_pattern(trace, layer=0, head=1, step=0)
    recorded = trace["attention"].sel(step=0, attn_layer=0, attn_head=1).values
    seen = ~np.isnan(recorded)
    np.testing.assert_allclose(row.dimension_values("attention"), recorded[seen], rtol=1e-6)
    assert list(row.dimension_values("key")) == list(np.flatnonzero(seen))
    assert plot_options(row)["xlabel"] == "position"
    assert ("token", "@{token}") in tooltips(row)
    # the prompt is longer than the budget: the cache evicted during step 0; later rows are still over positions,
    # with no attention on what was evicted
    evicted = trace["cache_evicted_at"].sel(layer=0, kv_head=int(trace["kv_head_of"].sel(head=1))).values
    assert (evicted == 0).any()
    later = viz.attention_pattern(trace, layer=0, head=1, step=2)
    assert plot_options(later)["xlabel"] == "position"
    keys = later.dimension_values("key").astype(int)
    gone = set(np.flatnonzero((evicted >= 0) & (evicted < 2)))
    assert all(attention == 0 for key, attention in zip(keys, later.dimension_values("attention")) if key in gone)


def test_cache_occupancy_states_are_what_the_cache_held(runs):
    trace = runs[0].steps
    alive = wb.trace.cache_alive(trace)
    merged = trace["cache_merged_into"] >= 0
    layer, kv_head = map(int, np.argwhere(merged.values.any(-1))[0])  # a head where kvmerger merged something
    states = viz.cache_states(trace, layer, kv_head)
    assert states.dims == ("step", "position")
    np.testing.assert_array_equal(states.values == "alive", alive.sel(layer=layer, kv_head=kv_head).values)
    gone = ~alive.sel(layer=layer, kv_head=kv_head) & (trace["position"] < int(trace["is_prompt"].sum()) +
                                                         trace["step"])
    np.testing.assert_array_equal(states.values == "merged", (gone & merged.sel(layer=layer, kv_head=kv_head)).values)
    assert {"alive", "evicted", "merged", "not yet cached"} == set(np.unique(states.values))

    raster = viz.cache_occupancy(trace, layer, kv_head)
    drawn = np.full(states.shape, "", dtype=object)  # paint the rectangles back onto a step x position grid
    for position, first, last, state in zip(*(raster.dimension_values(d) for d in
                                              ("position", "first_step", "last_step", "state"))):
        drawn[int(first):int(last) + 1, int(position)] = state
    np.testing.assert_array_equal(drawn, states.values)
    options = plot_options(raster)
    assert options["title"] == f"cache occupancy, layer {layer} KV head {kv_head}"
    assert (options["xlabel"], options["ylabel"]) == ("position (token)", "step (after generating)")
    model = hv.render(raster, backend="bokeh")
    assert len(model.select({"type": Legend})) == 1
    mapper, = model.select({"type": CategoricalColorMapper})  # the legend lists its factors in their colours
    assert dict(zip(mapper.factors, mapper.palette)) == style.CACHE_STATE_COLORS
    assert ("token", "@{token}") in tooltips(raster)


def test_cache_bytes_curve(runs):
    trace = runs[1].steps
    curve = viz.cache_bytes(trace)
    assert list(curve.dimension_values("cache_bytes")) == trace["cache_bytes"].values.tolist()
    assert plot_options(curve)["ylabel"] == "bytes held by the KV cache"
    assert ("token", "@{token}") in tooltips(curve)


def test_compare_marks_the_first_step_where_tokens_differ(runs):
    a, b = runs
    differ = [i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y]
    assert differ, "the sampled run should differ from the greedy one"
    expected = differ[0]
    assert viz.divergence_step(a, b) == expected
    layout = viz.compare(a, b, labels=("greedy", "sampled"))
    lines = elements(layout, hv.VLine)
    assert len(lines) == 2 and all(line.data == expected for line in lines)  # entropy and cache bytes
    assert all(f"diverge at step {expected}" in text.text for text in elements(layout, hv.Text))
    marks = elements(layout, hv.Rectangles, "marked")
    assert [list(mark.dimension_values("step")) for mark in marks] == [[expected], [expected]]
    entropy_a, entropy_b = elements(layout, hv.Curve)[:2]
    np.testing.assert_allclose(entropy_b.dimension_values("entropy"), b.steps["entropy"].values, rtol=1e-6)
    assert (entropy_a.label, entropy_b.label) == ("greedy", "sampled")
    assert ("token", "@{token}") in tooltips(layout)


def test_compare_accepts_traces_and_identical_runs(runs):
    a = runs[0].trace
    assert viz.divergence_step(a, a) is None
    assert viz.divergence_step(a, a.isel(step=slice(0, 4))) == 4  # a prefix diverges where it stops
    layout = viz.compare(a, a)
    assert not elements(layout, hv.VLine)
    assert "generated the same tokens" in plot_options(elements(layout, hv.Overlay)[0])["title"]


def test_entropy_overview_and_supported_plots_follow_the_records(runs):
    a, b = runs
    overview = viz.entropy(a.trace)
    assert [plot_options(p)["title"] for p in overview][1:] == [
        "next-token entropy", "attention entropy by step and layer (mean over heads)",
        "attention entropy per head (prompt mean)"]
    assert {"attention_pattern layer 0 head 0", "cache_occupancy layer 1 kv_head 0"} <= set(viz.supported_plots(a))
    assert not any(name.startswith("attention_pattern") for name in viz.supported_plots(b))
    assert list(viz.supported_plots(unrecorded(a.trace))) == ["token_stream"]


def test_fidelity_plots_whatever_fidelity_the_trace_holds(runs):
    trace = runs[0].steps
    recall = np.random.default_rng(0).uniform(0.5, 1.0, (6, 2, 4))
    kl = np.linspace(0.0, 0.3, 6)
    with_fidelity = trace.assign(attention_recall=(("step", "layer", "head"), recall), kl_vs_dense=("step", kl),
                                 attention_output_error=(("step", "layer", "head"), np.full((6, 2, 4), np.nan)))
    assert viz.fidelity_variables(with_fidelity) == ["attention_recall", "kl_vs_dense"]  # all-NaN is left out
    layout = viz.fidelity(with_fidelity)
    heatmap, = elements(layout, hv.HeatMap)
    np.testing.assert_allclose(heatmap.dimension_values("attention_recall"), recall.mean(-1).ravel())
    curve, = elements(layout, hv.Curve)
    np.testing.assert_allclose(curve.dimension_values("kl_vs_dense"), kl)
    assert ("token", "@{token}") in tooltips(layout)
    assert "fidelity" in viz.supported_plots(with_fidelity)
    with pytest.raises(WorkbenchError, match="record 'fidelity'"):
        viz.fidelity(trace)


def test_fidelity_of_a_real_recorded_run(tiny_llama):
    trace = wb.generate(tiny_llama, PROMPT, record=["fidelity"], max_new_tokens=3, ignore_eos=True).steps
    assert viz.fidelity_variables(trace) == ["attention_recall", "attention_output_error", "kl_vs_dense"]
    layout = viz.fidelity(trace)
    assert elements(layout, hv.Curve)[-1].dimension_values("kl_vs_dense").tolist() == \
        pytest.approx(trace["kl_vs_dense"].values.tolist())


def test_fidelity_shows_dense_attention_lost_to_eviction(tiny_llama):
    trace = wb.generate(tiny_llama, PROMPT, cache=wb.cache.get("streaming_llm", budget=8, sinks=2),
                        record=["fidelity"], max_new_tokens=4, ignore_eos=True).steps
    assert "cache_dropped_mass" in viz.fidelity_variables(trace)
    heatmap = elements(viz.fidelity(trace), hv.HeatMap)[-1]
    expected = trace["cache_dropped_mass"].mean("head").transpose("step", "layer").values.ravel()
    np.testing.assert_allclose(heatmap.dimension_values("cache_dropped_mass"), expected, rtol=1e-6)


@pytest.mark.parametrize("build,error,message", [
    (lambda a, b: viz.attention_pattern(b, 0, 0), WorkbenchError,
     "record 'attention' when generating to plot attention patterns"),
    (lambda a, b: viz.cache_occupancy(unrecorded(a.trace)), WorkbenchError, "record 'cache'"),
    (lambda a, b: viz.entropy(unrecorded(a.trace)), WorkbenchError, "record 'entropy'"),
    (lambda a, b: viz.attention_pattern(a, 2, 0), ParameterError,
     "attention layer 2 is out of range; the trace has attention layers 0..1"),
    (lambda a, b: viz.entropy_heatmap(a, head=4), ParameterError, "head 4 is out of range; the trace has heads 0..3"),
    (lambda a, b: viz.cache_occupancy(a, layer=0, kv_head=2), ParameterError, "kv_head 2 is out of range"),
    (lambda a, b: viz.head_entropy_map(a, step=6), ParameterError, "step 6 is out of range"),
    (lambda a, b: viz.entropy_heatmap(a, head="0"), ParameterError, "head must be an integer"),
    (lambda a, b: viz.token_stream("text"), WorkbenchError, "plots take a Run or its trace"),
])
def test_missing_records_and_bad_indices_are_named(runs, build, error, message):
    with pytest.raises(error, match=re.escape(message)):
        build(*runs)


def test_save_png_writes_a_png(runs, tmp_path):
    path = viz.save_png(viz.compare(*runs), tmp_path / "compare.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 400 and height > 200
    assert hv.Store.current_backend == "bokeh"  # drawing with matplotlib did not switch the notebook's backend
    with pytest.raises(WorkbenchError, match="expected a .png path"):
        viz.save_png(viz.entropy_curve(runs[0]), tmp_path / "plot.jpg")


def test_save_png_without_matplotlib_says_what_to_install(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "holoviews.plotting.mpl", None)  # as if matplotlib were missing
    with pytest.raises(WorkbenchError, match="pip install matplotlib"):
        viz.save_png(viz.entropy_curve(runs[0]), tmp_path / "plot.png")


def test_save_html_is_standalone(runs, tmp_path):
    page = viz.save_html(viz.entropy(runs[0].trace), tmp_path / "entropy.html").read_text()
    assert "<title>workbench plot</title>" in page
    assert "root.Bokeh" in page and 'type="application/json"' in page  # bokeh itself and the plot's document
    assert not re.search(r"<(script|link|img)\b[^>]*\b(src|href)\s*=", page)  # nothing loaded from anywhere


def test_setup_loads_bokeh_with_inline_resources():
    from bokeh.settings import settings

    viz.setup()
    assert hv.Store.current_backend == "bokeh" and settings.resources() == "inline"


def test_token_text_is_shown_readably_and_never_as_tex():
    assert [readable(t) for t in ["\n", "\t", "\x17", "", " the"]] == ["↵", "⇥", "\\x17", "∅", " the"]
    for token in ["$$x$$", "\\[a", "\\(b"]:  # bokeh would typeset these with MathJax, fetched from a CDN
        shown = readable(token)
        assert shown.replace("\u200b", "") == token and not any(d in shown for d in ("$$", "\\[", "\\("))
