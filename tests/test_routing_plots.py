"""Routing pictures from a real tiny MoE trace: they show the trace's data, name the token in hover, and ask for
record="routing" by name when it is missing."""

import holoviews as hv
import numpy as np
import pytest
from bokeh.models import HoverTool

import workbench as wb
from workbench import viz
from workbench.errors import WorkbenchError
from workbench.routers import expert_cache, prediction
from workbench.routers.events import routing_events


@pytest.fixture(scope="module")
def run():
    model = wb.models.tiny("mixtral", num_hidden_layers=3)
    return wb.generate(model, "one two three", record="routing", max_new_tokens=8, ignore_eos=True)


def _tooltips(plot):
    model = hv.render(plot, backend="bokeh")
    return [tip for tool in model.select({"type": HoverTool}) for tip in tool.tooltips]


def test_expert_map_shows_each_tokens_top_expert(run):
    plot = viz.expert_map(run)
    events = routing_events(run.trace)
    data = plot.data
    for row in data.itertuples():
        assert row.expert == events[row.token_index, row.layer, 0]
    assert len(data) == events.shape[0] * events.shape[1]
    assert ("token", "@{token}") in _tooltips(plot)


def test_expert_load_shares_sum_to_one_per_layer(run):
    data = viz.expert_load(run).data
    assert np.allclose(data.groupby("layer")["share"].sum(), 1.0)


def test_router_entropy_is_the_traces(run):
    data = viz.router_entropy(run).data
    steps = run.trace.router_entropy.values[0]
    assert np.isclose(data[(data.token_index == data.token_index.max()) & (data.layer == 0)]["entropy"].item(),
                      steps[-1, 0])


def test_cache_prediction_and_consistency_plots_draw_their_inputs(run):
    events = routing_events(run.trace)
    curve = expert_cache.hit_rates(events, capacity_in_active=[1, 2])
    plot = viz.cache_hit_rates({"lru": curve})
    assert np.allclose(plot.get(0).data["hit_rate"], curve.hit_rate)
    quality = viz.prediction_quality({"fate": prediction.fate(run.trace)}, events)
    precision, _ = prediction.precision_recall(prediction.fate(run.trace), events)
    assert np.allclose(quality.get(0).data["precision"], precision[~np.isnan(precision)])
    assert len(viz.routing_consistency(events, lengths=[4]).get(0).data) == 1


def test_a_trace_without_routing_asks_for_it():
    dense = wb.generate(wb.models.tiny("llama"), "x", max_new_tokens=2)
    with pytest.raises(WorkbenchError, match="record 'routing'"):
        viz.expert_map(dense)
