"""Decoding pictures: the bars are the trace's verify passes, the stream's cells its token origins, and a trace
without the records fails naming what to record."""

import numpy as np
import pytest

import workbench as wb

REPEAT = "Repeat after me: a stitch in time saves nine. a stitch in time saves nine. a stitch"


@pytest.fixture
def drafted(tiny_llama):
    return wb.generate(tiny_llama, REPEAT, decoder=wb.decode.get("cache_draft", draft_budget=24, k=3),
                       max_new_tokens=24, ignore_eos=True, record=["decoding", "entropy"])


def test_the_histogram_and_position_bars_count_the_verify_passes(drafted):
    drafted_counts = drafted.steps["verify_drafted"].values
    kept = drafted.steps["verify_accepted"].values[drafted_counts >= 0]
    bars = wb.viz.accepted_lengths(drafted)
    np.testing.assert_array_equal(bars.dimension_values("passes"), np.bincount(kept, minlength=4))
    by_position = wb.viz.acceptance_by_position(drafted)
    measured = by_position.get(0).dimension_values("kept")
    np.testing.assert_allclose(measured, [(kept > i).mean() for i in range(3)])  # every pass drafted 3


def test_the_origin_stream_has_a_cell_per_token_in_its_origin(drafted):
    stream = wb.viz.token_stream(drafted, color_by="origin")
    cells = {layer.label: len(layer) for layer in stream if layer.label in wb.viz.style.ORIGIN_COLORS}
    origins = drafted.steps["token_origin"].values
    assert cells == {o: int((origins == o).sum()) for o in set(origins)}
    wb.viz.decoding(drafted)  # the layout builds
    assert {"acceptance_by_position", "accepted_lengths", "phase_times"} <= set(wb.viz.supported_plots(drafted))


def test_phase_times_add_up_to_the_forward_seconds(drafted):
    bars = wb.viz.phase_times(drafted)
    seconds = dict(zip(bars.dimension_values("phase"), bars.dimension_values("seconds")))
    phases = drafted.steps["forward_phase"].values
    forward = drafted.steps["forward_seconds"].values
    assert seconds["verify"] == pytest.approx(forward[phases == "verify"].sum())
    assert seconds["draft"] == pytest.approx(np.nansum(drafted.steps["draft_seconds"].values))


def test_plots_without_the_records_say_what_to_record(tiny_llama):
    plain = wb.generate(tiny_llama, "hi", max_new_tokens=3, record=["decoding"])
    with pytest.raises(wb.WorkbenchError, match="record 'decoding'"):
        wb.viz.accepted_lengths(plain)
    with pytest.raises(wb.WorkbenchError, match="no decoding telemetry"):
        wb.viz.decoding(plain)
    with pytest.raises(wb.ParameterError, match="color_by must be 'entropy' or 'origin'"):
        wb.viz.token_stream(plain, color_by="nope")
