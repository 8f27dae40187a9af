"""Traces: named dimensions, token coordinates, the run's configuration, netCDF round trip, cache records."""

import numpy as np
import pytest
import xarray as xr

import workbench as wb
from workbench.cache.testing import assert_bytes_are_real

PROMPT = "Traces keep what happened"


@pytest.fixture(scope="module")
def full_run(tiny_models):
    model = tiny_models["llama"]
    return model, wb.generate(model, PROMPT, max_new_tokens=6, ignore_eos=True,
                              record=["entropy", "attention", "logits", "cache"])


def test_dimensions_and_coordinates_are_named(full_run):
    model, run = full_run
    trace = run.steps
    n_prompt = len(run.prompt_ids)
    assert dict(trace.sizes) == {"step": 6, "forward": 6, "position": n_prompt + 6, "layer": 2, "head": 4,
                                 "kv_head": 2, "query": n_prompt, "attn_layer": 2, "attn_head": 4, "vocab": 320,
                                 "cache_part": 1}  # a full cache: its `dense` buffers
    assert run.trace.sizes["sequence"] == 1 and all(run.trace[v].dims[0] == "sequence" for v in run.trace.data_vars)
    assert trace["forward_phase"].values.tolist() == ["prefill"] + ["decode"] * 5
    assert trace["forward_of_step"].values.tolist() == list(range(6))  # one forward pass chose each token
    assert trace["attention_entropy"].dims == ("step", "layer", "head")
    assert trace["prompt_attention_entropy"].dims == ("layer", "head", "query")
    assert trace["attention"].dims == ("step", "attn_layer", "attn_head", "position")
    assert trace["cache_tokens"].dims == ("step", "layer", "kv_head")
    assert list(trace["token"].values) == model.token_strings(run.token_ids)
    assert list(trace["position_token"].values) == model.token_strings(run.prompt_ids + run.token_ids)
    assert trace["is_prompt"].values.sum() == n_prompt
    assert list(trace["kv_head_of"].values) == [0, 0, 1, 1]
    assert trace["entropy"].attrs["units"] == "nats"


def test_configuration_travels_in_attrs(full_run):
    _, run = full_run
    config = wb.trace.trace_config(run.trace)
    assert config["model"] == "tiny-llama" and config["prompt"] == PROMPT
    assert (config["attention"], config["cache"], config["decoder"], config["router"]) == \
           ("sdpa", "full", "greedy", "native")
    assert config["record"] == ["attention", "cache", "entropy", "logits"]
    assert run.trace.attrs["max_new_tokens"] == 6


def test_netcdf_round_trip_is_identical(full_run, tmp_path):
    _, run = full_run
    path = run.save(tmp_path / "run.nc")
    loaded = wb.load_trace(path)
    xr.testing.assert_identical(loaded, run.trace)
    assert loaded["token"].values[0].tolist() == run.steps["token"].values.tolist()


def test_cache_records_are_the_bytes_the_tensors_hold(full_run):
    model, run = full_run
    trace = run.steps
    n_prompt = len(run.prompt_ids)
    held = n_prompt + np.arange(6)  # after step s the cache holds the prompt and the first s new tokens
    assert (trace["cache_tokens"].values == held[:, None, None]).all()
    text = model.text_config
    bytes_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 4  # K and V, fp32
    # the prefill allocates exactly the prompt; the first new token grows the buffers by their slack (8 slots)
    capacity = np.where(np.arange(6) == 0, n_prompt, n_prompt + 1 + 8)
    assert trace["cache_bytes"].values.tolist() == (capacity * bytes_per_token).tolist()
    assert run.peak_cache_bytes == run.held_cache_bytes == capacity.max() * bytes_per_token  # nothing compressed
    assert_bytes_are_real(model, trace)


def test_attention_rows_for_chosen_layers_and_heads(tiny_llama):
    run = wb.generate(tiny_llama, PROMPT, max_new_tokens=3, record={"attention": {"layers": [1], "heads": [0, 3]}})
    assert run.steps["attn_layer"].values.tolist() == [1]
    assert run.steps["attn_head"].values.tolist() == [0, 3]
    rows = run.steps["attention"].values
    assert rows.shape == (3, 1, 2, len(run.prompt_ids) + 3)
    np.testing.assert_allclose(np.nansum(rows, axis=-1), 1.0, rtol=1e-5)  # each row is a distribution


def test_nothing_recorded_keeps_only_tokens_and_timings(tiny_llama):
    run = wb.generate(tiny_llama, PROMPT, max_new_tokens=3)
    assert list(run.trace.data_vars) == ["step_seconds", "forward_seconds", "forward_phase", "forward_start",
                                         "forward_tokens"]
    assert run.trace.sizes["step"] == 3


def test_bad_record_requests_fail_clearly(tiny_llama):
    with pytest.raises(wb.ParameterError, match="cannot record 'experts'; recordable: entropy, attention"):
        wb.generate(tiny_llama, PROMPT, record=["experts"])
    with pytest.raises(wb.ParameterError, match=r"layers \[7\] out of range; the model has 2 layers"):
        wb.generate(tiny_llama, PROMPT, record={"attention": {"layers": [7]}})
    with pytest.raises(wb.ParameterError, match="takes 'layers' and 'heads'"):
        wb.generate(tiny_llama, PROMPT, record={"attention": {"rows": [1]}})


@pytest.mark.parametrize("policy", ["h2o", "pyramidkv"])
def test_attention_rows_of_evicting_caches_are_over_positions(tiny_models, policy):
    """Attention rows are recorded over token positions, not cache slots: evicted positions get no attention,
    and layers holding different numbers of tokens (pyramidkv) still line up."""
    model = tiny_models["llama"]
    cache = wb.cache.get(policy, budget=12, window=4)
    run = wb.generate(model, PROMPT, cache=cache, max_new_tokens=5, ignore_eos=True, record=["attention", "cache"])
    full = wb.generate(model, PROMPT, max_new_tokens=1, record=["attention"])
    trace = run.steps
    # the prefill attends before anything is evicted: the same rows as with the full cache
    n_prompt = len(run.prompt_ids)
    np.testing.assert_allclose(trace["prompt_attention"].values[..., :n_prompt],
                               full.steps["prompt_attention"].values[..., :n_prompt], atol=1e-6)
    evicted_at = trace["cache_evicted_at"].values  # (layer, kv_head, position)
    for step in range(1, 5):
        row = trace["attention"].isel(step=step).values  # (layer, head, position)
        seen = row[..., :n_prompt + step]
        np.testing.assert_allclose(seen.sum(-1), 1.0, atol=1e-5)
        gone = (evicted_at >= 0) & (evicted_at < step)  # evicted by an earlier step
        gone_per_head = gone[:, trace["kv_head_of"].values, :n_prompt + step]
        assert gone_per_head.any() and (seen[gone_per_head] == 0).all()


def test_the_readme_table_is_the_schema(tiny_llama):
    """The README's table of trace variables is generated from the declarations (workbench.trace.schema)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert wb.trace.schema.markdown_table() in readme
    run = wb.generate(tiny_llama, PROMPT, max_new_tokens=2, record=list(wb.RECORDABLE))
    declared = wb.trace.schema.variables(set(wb.RECORDABLE))
    assert set(run.trace.data_vars) <= {v.name for v in declared}  # nothing undeclared reaches a trace
    for variable in declared:
        if variable.name in run.trace:
            assert run.trace[variable.name].dims == variable.full_dims
            assert run.trace[variable.name].attrs["units"] == variable.units


@pytest.fixture
def telemetry():
    """A record option and variable a test component declares, removed again afterwards."""
    schema = wb.trace.schema
    schema.option("test_telemetry", "a variable a test decoder declares")
    schema.declare("draft_length", ("step",), "tokens", "tokens a decoder proposed at this step", "test_telemetry",
                   "a test decoder", "int64")
    yield
    del schema.VARIABLES["draft_length"], schema.OPTIONS["test_telemetry"]


def test_components_declare_their_own_variables_and_record_them(tiny_llama, telemetry):

    class Counting(wb.decode.Greedy):
        name = "counting"

        def step(self, ctx):
            ctx.record("draft_length", 3)
            return super().step(ctx)

    run = wb.generate(tiny_llama, PROMPT, decoder=Counting(), max_new_tokens=4, record=["test_telemetry"])
    assert run.steps["draft_length"].values.tolist() == [3, 3, 3, 3]
    assert run.steps["draft_length"].attrs["description"] == "tokens a decoder proposed at this step"
    with pytest.raises(wb.ParameterError, match="no trace variable 'undeclared'"):
        wb.run.StepContext(None, None, [], None, wb.trace.Recorder(wb.trace.RecordSpec(), 2, 4)).record(
            "undeclared", 1)


def test_a_step_records_the_pass_that_chose_it_not_the_look_aheads_after_it(tiny_llama):
    """A decoder that rolls out (and rolls back) a look-ahead each step but picks greedily records the same
    per-step values as plain greedy decoding: each step points at the forward pass whose logits chose it."""
    class Peeking(wb.decode.Greedy):
        name = "peeking"

        def step(self, ctx):
            logits = ctx.logits
            mark = ctx.session.mark()
            ctx.session.feed([int(logits.argmax())], "rollout")
            ctx.session.rollback(mark)
            return [int(logits.argmax())]

    record = ["entropy", "attention"]
    plain = wb.generate(tiny_llama, PROMPT, max_new_tokens=5, ignore_eos=True, record=record)
    peeking = wb.generate(tiny_llama, PROMPT, decoder=Peeking(), max_new_tokens=5, ignore_eos=True, record=record)
    assert peeking.token_ids == plain.token_ids
    phases = peeking.steps["forward_phase"].values
    assert [phases[f] for f in peeking.steps["forward_of_step"].values] == ["prefill"] + ["decode"] * 4
    for name in ("entropy", "attention_entropy", "attention"):
        np.testing.assert_allclose(peeking.steps[name].values, plain.steps[name].values, atol=1e-6, equal_nan=True)
