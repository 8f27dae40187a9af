"""kv_quant_error for every store that quantizes: what a store measured as it quantized equals the error of what it
gives back when read, against the float keys and values.

The reference: layer 0's keys and values depend on the tokens only, so a full cache fed the same prompt holds the
floats each store started from. What a store quantized is read back through its own read path (view, or the
pools), which shares no code with the measurement, and the per-KV-head relative error is recomputed from the two."""

import pytest
import torch

import workbench as wb

PROMPT = "The quick brown fox jumps over the lazy dog. " * 3  # 135 byte tokens on the tiny models


def _ordered(store, first):
    """(keys, values) (kv_heads, n, D) read back, with the positions each side quantized: first[side].."""
    keys, values = (t[0].float() for t in store.view())
    return [(x[:, start:end], torch.arange(start, end).expand(x.shape[0], -1))
            for x, (start, end) in zip((keys, values), first)]


def read_back(store, name):
    """Per side: what the store quantized, read back (kv_heads, n, D), and the positions it holds (-1: padding)."""
    if name == "kivi":
        return _ordered(store, [(0, side.quantized) for side in store.sides])
    if name == "kvquant":  # the sink (position 0) is kept exact
        return _ordered(store, [(1, side.quantized) for side in store.sides])
    if name == "fp8":
        return _ordered(store, [(0, store.slots)] * 2)
    keys, values, positions = store.pooled(torch.float32)  # mixed precision: the pools
    return [(keys, positions), (values, positions)]


POLICIES = {"kivi": lambda: wb.cache.get("kivi", group=8, residual=16),
            "kvquant": lambda: wb.cache.get("kvquant", bits=2),
            "fp8": lambda: wb.cache.get("fp8", scaling="token_head"),
            "mikv": lambda: wb.cache.get("mikv", budget=24, options="sinks=2,window=4", bits=2),
            "zipcache": lambda: wb.cache.get("zipcache", gap=2)}


@pytest.mark.parametrize("name", list(POLICIES))
def test_the_measured_error_is_the_error_of_what_the_store_reads_back(tiny_llama, name):
    ids = tiny_llama.encode(PROMPT)[0].tolist()
    with wb.Session(tiny_llama, POLICIES[name]()) as quantized, wb.Session(tiny_llama, "full") as full:
        quantized.cache.measure_quant_error()
        quantized.feed(ids, "prefill")
        for token in (5, 6, 7):
            quantized.feed([token], "decode")
        full.feed(ids + [5, 6, 7], "prefill")
        measured = quantized.cache.quant_error()
        floats = [t[0].float() for t in full.cache.layers[0].store.view()]
        for side, ((x_hat, positions), x) in enumerate(zip(read_back(quantized.cache.layers[0].store, name), floats)):
            for head in range(x.shape[0]):
                held = positions[head] >= 0
                assert int(held.sum()) > 0, (name, side, head)  # something was quantized
                truth = x[head, positions[head][held]]
                expected = float((truth - x_hat[head][held]).norm() / truth.norm())
                assert float(measured[0, head, side]) == pytest.approx(expected, rel=1e-3, abs=1e-6), (side, head)
                assert 0 < expected < 1


def test_every_quantizing_cache_records_kv_quant_error_in_the_trace(tiny_llama):
    for name, make in POLICIES.items():
        run = wb.generate(tiny_llama, PROMPT, cache=make(), max_new_tokens=4, ignore_eos=True, record=["cache"])
        error = run.trace["kv_quant_error"].isel(sequence=0, step=-1)
        assert error.dims == ("layer", "kv_head", "side"), name
        assert bool(error.notnull().all()) and bool((error > 0).all()), name


def test_the_heatmap_has_a_cell_per_layer_head_and_side_with_the_trace_values(tiny_llama):
    run = wb.generate(tiny_llama, PROMPT, cache=POLICIES["kivi"](), max_new_tokens=4, ignore_eos=True,
                      record=["cache"])
    data = wb.viz.quant_error(run).data
    error = run.trace["kv_quant_error"].isel(sequence=0, step=-1)
    assert len(data) == error.size == 2 * 2 * 2  # layers x KV heads x sides
    for row in data.itertuples():
        side, head = row.head.split(" h")
        assert row.error == pytest.approx(float(error.sel(layer=row.layer, side=side).isel(kv_head=int(head))))
    full = wb.generate(tiny_llama, PROMPT, cache="full", max_new_tokens=2, record=["cache"])
    with pytest.raises(wb.WorkbenchError, match="does not quantize"):
        wb.viz.quant_error(full)
