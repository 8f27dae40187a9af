"""The Workbench panel without a browser: generated controls, runs on a tiny model, Stop, errors, compare mode."""

import html
import threading
import typing

import ipywidgets as widgets
import numpy as np
import pandas as pd
import pytest

import workbench as wb
from workbench.widgets import ComponentPicker, Throttle, Workbench, control_for, value_of

REGISTRIES = {family: module.registry for family, module in wb.FAMILIES.items()}


def run_to_end(panel: Workbench) -> None:
    panel.run()
    panel.wait(timeout=120)
    assert not panel.running


@pytest.fixture
def panel(tiny_llama) -> Workbench:
    return Workbench(tiny_llama, "hello there", chat=False, max_new_tokens=10)


@pytest.mark.parametrize("family", REGISTRIES)
def test_controls_match_declared_params(family):
    registry = REGISTRIES[family]
    for name in registry.available():
        picker = ComponentPicker(registry, family, name, int_limit=1024)
        specs = registry.component_class(name).parameters()
        assert list(picker.controls) == [spec.name for spec in specs]
        for spec in specs:
            control = picker.controls[spec.name]
            assert control.description == spec.name and control.tooltip == spec.help
            if spec.choices is not None:
                assert isinstance(control, widgets.Dropdown) and tuple(control.options) == spec.choices
            elif type(None) in typing.get_args(spec.type):
                assert isinstance(control, widgets.Text)
            elif spec.min is not None and spec.max is not None and spec.type in (int, float):
                assert isinstance(control, (widgets.IntSlider, widgets.FloatSlider))
                assert (control.min, control.max) == (spec.min, spec.max)
        # the defaults the controls hold build the same component as the registry's defaults
        assert picker.component().params() == registry.get(name).params()


def test_control_rules():
    snapkv = {spec.name: spec for spec in wb.cache.registry.component_class("snapkv").parameters()}
    budget = control_for(snapkv["budget"], int_limit=2048)
    assert isinstance(budget, widgets.IntSlider) and (budget.min, budget.max, budget.value) == (1, 2048, 128)
    ratio = control_for(snapkv["ratio"])
    assert isinstance(ratio, widgets.Text) and value_of(ratio, snapkv["ratio"]) is None
    ratio.value = "0.25"
    assert wb.cache.get("snapkv", ratio=value_of(ratio, snapkv["ratio"])).ratio == 0.25
    sample = {spec.name: spec for spec in wb.decode.registry.component_class("sample").parameters()}
    temperature = control_for(sample["temperature"])
    assert isinstance(temperature, widgets.FloatSlider) and temperature.value == 1.0 and temperature.step <= 0.01
    cake = {spec.name: spec for spec in wb.cache.registry.component_class("cake").parameters()}
    assert isinstance(control_for(cake["gamma"]), widgets.BoundedFloatText)  # no declared maximum: none invented


def test_selecting_a_component_rebuilds_its_controls():
    picker = ComponentPicker(wb.decode.registry, "decoder", "greedy")
    assert picker.controls == {}
    picker.dropdown.value = "sample"
    assert list(picker.controls) == ["temperature", "top_k", "top_p", "min_p", "seed"]
    assert list(picker.params_box.children) == list(picker.controls.values())
    picker.controls["temperature"].value = 0.5
    assert picker.component().temperature == 0.5


def test_run_fills_text_and_feeds_the_live_streams(panel):
    run_to_end(panel)
    assert panel.error.value == "" and "done" in panel.status.value
    [run] = panel.runs
    assert len(run.token_ids) == 10 and panel.progress.value == 10
    assert html.escape(run.text) in panel.text_a.value
    trace = run.steps
    entropy, cache = panel.live.entropy.data, panel.live.cache_bytes.data
    np.testing.assert_array_equal(entropy["step"].to_numpy(), np.arange(10))
    np.testing.assert_allclose(entropy["entropy"].to_numpy(), trace["entropy"].values)
    np.testing.assert_array_equal(cache["cache_bytes"].to_numpy(), trace["cache_bytes"].values)
    np.testing.assert_allclose(panel.live.attention.data, trace["attention_entropy"].values[-1])
    assert not panel.run_button.disabled and panel.stop_button.disabled


def test_a_browser_message_waits_until_a_live_redraw_is_pushed(monkeypatch):
    """panel applies a browser message between doc.hold() and doc.unhold(), which drops the document changes not
    pushed yet: a redraw from the generation thread that such a message interrupts never reaches the browser. The
    panel's guard makes panel's handler for its displayed plots wait until a redraw has been sent."""
    import panel as pn

    from workbench import viz
    from workbench.widgets.live import LivePlots
    from workbench.widgets.offline import offline_view

    viz.setup()
    monkeypatch.setattr(pn.extension, "_loaded", True)  # as after pn.extension() in a notebook
    live = LivePlots(num_layers=2, num_heads=3)
    view = offline_view(live.layout())
    assert view._repr_mimebundle_() is not None  # rendered as a notebook renders it: a comm pair per display
    [(_, client_comm)] = view._comms.values()
    order = []
    client_comm._on_msg = lambda message: order.append("message applied")  # where panel's handler sits
    assert live.lock.guard(view) == 1 and live.lock.guard(view) == 1  # guarding twice wraps once

    redrawing, release = threading.Event(), threading.Event()
    frame = pd.DataFrame({"step": [0], "entropy": [1.5]})
    def redraw_held_half_way():
        with live.lock:
            live.entropy.send(frame)
            redrawing.set()
            release.wait(10)
            order.append("sent")

    redraw = threading.Thread(target=redraw_held_half_way)
    redraw.start()
    assert redrawing.wait(10)
    browser = threading.Thread(target=client_comm._handle_msg, args=({"comm_id": client_comm.id, "content": {}},))
    browser.start()
    browser.join(0.3)
    assert order == [], "the browser's message was applied in the middle of a redraw"
    release.set()
    redraw.join(10)
    browser.join(10)
    assert order == ["sent", "message applied"]
    assert live.entropy.data["entropy"].tolist() == [1.5]


def test_live_attention_row_and_cache_raster_follow_the_chosen_layer_and_head(tiny_llama):
    panel = Workbench(tiny_llama, "The quick brown fox jumps over the lazy dog. " * 2, chat=False, max_new_tokens=12,
                      record=("entropy", "cache", "attention"), cache="streaming_llm", ignore_eos=True)
    panel.config_a.pickers["cache"].controls["budget"].value = 40
    panel.live_layer.value, panel.live_head.value = 1, 3
    run_to_end(panel)
    assert panel.error.value == ""
    [run] = panel.runs
    trace = run.steps
    # the row: the last step's attention of layer 1, head 3 over the positions it saw, with their tokens
    row = panel.live.attention_row.data
    expected = trace["attention"].sel(attn_layer=1, attn_head=3).isel(step=-1).values
    seen = np.isfinite(expected)
    np.testing.assert_array_equal(row["position"].to_numpy(), np.flatnonzero(seen))
    np.testing.assert_allclose(row["weight"].to_numpy(), expected[seen])
    tokens = wb.viz.inputs.position_tokens(trace)
    assert row["token"].tolist() == [tokens[p] for p in np.flatnonzero(seen)]
    # the raster: what layer 1's KV head 1 (head 3 // 2 groups) held after each step, from the trace's own log
    alive = wb.trace.cache_alive(trace).sel(layer=1, kv_head=1).values  # (step, position)
    raster = panel.live.cache_raster.data
    assert raster.shape == (12, len(run.prompt_ids) + 11) and not alive[:, raster.shape[1]:].any()  # last: unfed
    alive = alive[:, :raster.shape[1]]
    given = np.arange(raster.shape[1])[None] < len(run.prompt_ids) + np.arange(12)[:, None]
    np.testing.assert_array_equal(raster == 1, alive)
    np.testing.assert_array_equal(raster == 2, given & ~alive)  # evicted (streaming_llm never merges)
    np.testing.assert_array_equal(raster == 0, ~given)
    assert (raster == 2).any()
    # choosing another head redraws the raster from the same run's events
    panel.live_head.value = 0
    np.testing.assert_array_equal(panel.live.cache_raster.data == 1,
                                  wb.trace.cache_alive(trace).sel(layer=1, kv_head=0).values[:, :raster.shape[1]])


def test_live_acceptance_shows_each_verify_pass_of_a_speculative_run(tiny_llama):
    """The live acceptance curve gets one row per verify pass, holding the tokens the trace says it gave."""
    panel = Workbench(tiny_llama, "a stitch in time saves nine. a stitch in time saves nine. a", chat=False,
                      max_new_tokens=16, decoder="cache_draft", ignore_eos=True)
    panel.config_a.pickers["decoder"].controls["draft_budget"].value = 24
    run_to_end(panel)
    assert panel.error.value == ""
    [run] = panel.runs
    drafted = run.steps["verify_drafted"].values
    accepted = run.steps["verify_accepted"].values[drafted >= 0]
    live = panel.live.acceptance.data
    assert len(accepted) > 0
    np.testing.assert_array_equal(live["verify"].to_numpy(), np.arange(len(accepted)))
    np.testing.assert_array_equal(live["tokens"].to_numpy(), accepted + 1)


def test_live_experts_show_the_latest_tokens_routing_on_an_moe_model():
    """An MoE model's panel records routing by default and its live experts plot holds the last step's experts;
    a dense model's panel has no experts plot and does not record routing."""
    model = wb.models.tiny("mixtral")
    panel = Workbench(model, "experts", chat=False, max_new_tokens=6, router="top_k")
    assert panel.record["routing"].value
    panel.config_a.pickers["router"].controls["k"].value = 1
    run_to_end(panel)
    assert panel.error.value == ""
    [run] = panel.runs
    np.testing.assert_array_equal(panel.live.experts.data, run.trace.expert_ids.values[0, -1])
    assert (panel.live.experts.data[:, 0] >= 0).all() and (panel.live.experts.data[:, 1:] == -1).all()  # top-1
    image = panel.live._experts_image(panel.live.experts.data)
    assert image.opts.get().kwargs["title"] == "experts of the latest token"
    dense = Workbench(wb.models.tiny("llama"), "dense", chat=False)
    assert not dense.record["routing"].value and dense.live.num_experts == 0


def test_stop_ends_the_run_early_and_keeps_the_text(panel):
    panel.max_new_tokens.value = 200
    add = panel.live.add

    def add_then_press_stop(event):
        add(event)
        if event.step == 3:
            panel.stop()

    panel.live.add = add_then_press_stop
    run_to_end(panel)
    assert panel.runs == [] and "stopped" in panel.status.value
    assert "stopped after 4 tokens" in panel.text_a.value
    assert len(panel.live.entropy.data) == 4  # the plots keep what was generated before Stop
    assert not panel.run_button.disabled and panel.stop_button.disabled


def test_bad_parameter_shows_an_error_and_run_stays_usable(panel):
    decoder = panel.config_a.pickers["decoder"]
    decoder.dropdown.value = "sample"
    decoder.controls["temperature"].value = 0.0
    run_to_end(panel)
    assert "ParameterError" in panel.error.value and "temperature" in panel.error.value
    assert panel.runs == [] and not panel.run_button.disabled
    decoder.controls["temperature"].value = 0.7
    run_to_end(panel)
    assert panel.error.value == "" and len(panel.runs) == 1
    assert panel.runs[0].config["decoder_params"]["temperature"] == 0.7


def test_error_during_generation_shows_in_the_panel(panel):
    panel.prompt.value = "   "
    run_to_end(panel)
    assert "PromptError" in panel.error.value and "empty" in panel.error.value
    assert "failed" in panel.status.value and not panel.run_button.disabled and panel.stop_button.disabled


def test_compare_mode_runs_both_configurations(panel):
    panel.compare.value = True
    assert panel.config_b.widget.layout.display != "none"
    panel.config_b.pickers["cache"].dropdown.value = "streaming_llm"
    panel.config_b.pickers["cache"].controls["budget"].value = 4
    run_to_end(panel)
    assert panel.error.value == ""
    run_a, run_b = panel.runs
    assert (run_a.config["cache"], run_b.config["cache"]) == ("full", "streaming_llm")
    assert run_b.peak_cache_bytes < run_a.peak_cache_bytes
    assert html.escape(run_b.text) in panel.text_b.value


def test_bad_constructor_arguments_are_named(tiny_llama):
    with pytest.raises(wb.ParameterError, match="recordable"):
        Workbench(tiny_llama, record=["entropy", "everything"])
    with pytest.raises(wb.ParameterError, match="max_new_tokens"):
        Workbench(tiny_llama, max_new_tokens=0)
    with pytest.raises(wb.UnknownComponentError, match="registered"):
        Workbench(tiny_llama, cache="no_such_cache")


def test_throttle_waits_longer_when_drawing_is_slow():
    throttle = Throttle(interval=0.2, share=0.1)
    assert throttle.due()
    throttle.drew(1.0)  # a one-second redraw: the next waits ~10 s so drawing stays ~10% of the time
    assert not throttle.due() and throttle.due(force=True)
    throttle.restart()
    assert throttle.due()
