"""Layer routers and the logit lens (issue 11, item 6), against independent references computed in the test with
the unmodified model: transformers' own hidden states (output_hidden_states) and forward hooks on its decoder
layers, and a greedy loop over a model whose decoding layer list has the skipped layers removed."""

import math

import numpy as np
import pytest
import torch
from transformers import DynamicCache

import workbench as wb
from workbench.errors import ParameterError, WorkbenchError
from workbench.routers.early_exit import early_exit, first_confident_layer

PROMPT = "The old lighthouse keeper climbed the stairs every evening to light the lamp, and"


def prompt_ids(model) -> torch.Tensor:
    return model.encode(PROMPT).cpu()


def layer_streams(model, ids) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each decoder layer's input and output (tokens, hidden) for a plain forward of `ids` (forward hooks, no
    workbench), and the logits."""
    inputs, outputs, hooks = {}, {}, []
    for index, layer in enumerate(model.hf.get_decoder().layers):
        def hook(module, args, kwargs, output, index=index):
            inputs[index] = (args[0] if args else kwargs["hidden_states"])[0].float()
            outputs[index] = (output[0] if isinstance(output, tuple) else output)[0].float()
        hooks.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            logits = model.hf(input_ids=ids).logits[0].float()
    finally:
        for h in hooks:
            h.remove()
    n = len(inputs)
    return [(inputs[i], outputs[i]) for i in range(n)], logits


def test_logit_lens_and_similarity_match_the_models_own_hidden_states(embedded):
    """record='layers': each step's lens top token and KL at every layer equal the model's hidden states
    (transformers' output_hidden_states: layer l's output is hidden_states[l + 1], before the final norm except
    the last) through the final norm and LM head; the last layer's lens is the model's logits (KL 0)."""
    run = wb.generate(embedded, PROMPT, max_new_tokens=6, ignore_eos=True, record="layers")
    ids = torch.tensor([run.prompt_ids + list(run.token_ids[:-1])])
    n_prompt = len(run.prompt_ids)
    with torch.no_grad():
        out = embedded.hf(input_ids=ids, output_hidden_states=True)
    decoder, head = embedded.hf.get_decoder(), embedded.hf.get_output_embeddings()
    trace = run.trace.isel(sequence=0)
    layers = embedded.num_layers
    with torch.no_grad():
        for step in range(6):
            row = n_prompt - 1 + step  # the query that chose token `step`
            final = torch.log_softmax(out.logits[0, row].float(), -1)
            for layer in range(layers):
                hidden = out.hidden_states[layer + 1][0, row]
                lens = torch.log_softmax(head(hidden if layer == layers - 1 else decoder.norm(hidden)).float(), -1)
                assert int(trace["lens_token"][step, layer]) == int(lens.argmax())
                kl = float((final.exp() * (final - lens)).sum())
                assert float(trace["lens_kl"][step, layer]) == pytest.approx(kl, abs=2e-3 + 1e-3 * kl)
            assert int(trace["lens_token"][step, -1]) == run.token_ids[step]  # greedy: the model's top token
    streams, _ = layer_streams(embedded, ids[:, :n_prompt])
    reference = np.stack([torch.nn.functional.cosine_similarity(i, o, dim=-1).numpy() for i, o in streams], 1)
    np.testing.assert_allclose(trace["prompt_layer_similarity"].values, reference, atol=1e-4)
    assert (trace["layer_skipped"].values == 0).all()
    table = early_exit(run.trace)
    assert table["agreement"].iloc[-1] == 1.0 and table["kl"].iloc[-1] == pytest.approx(0.0, abs=1e-4)
    assert first_confident_layer(run.trace, 1.0) <= layers - 1


@pytest.mark.parametrize("metric", ["bi", "angular"])
def test_layer_skip_router_skips_the_layers_the_prompt_says_and_decodes_as_a_model_without_them(embedded, metric):
    """The skipped set equals ShortGPT's Block Influence ranking (or Gromov et al.'s most similar block) computed
    here from forward hooks on the prompt; the tokens equal a greedy loop whose decode passes run a layer list
    without those layers over the full prefill's cache."""
    router = wb.routers.get("layer_skip", share=0.2, metric=metric)
    run = wb.generate(embedded, PROMPT, router=router, max_new_tokens=8, ignore_eos=True, record="layers")
    ids = prompt_ids(embedded)
    streams, _ = layer_streams(embedded, ids)
    n, layers = int(0.2 * embedded.num_layers), embedded.num_layers
    if metric == "bi":
        influence = {i: 1 - float(torch.nn.functional.cosine_similarity(x, y, dim=-1).mean())
                     for i, (x, y) in enumerate(streams)}
        expected = set(sorted(range(1, layers), key=influence.get)[:n])
    else:
        stream = [x[-1] for x, _ in streams] + [streams[-1][1][-1]]
        distance = {start: math.acos(max(-1.0, min(1.0, float(torch.nn.functional.cosine_similarity(
            stream[start], stream[start + n], dim=0))))) / math.pi for start in range(1, layers - n + 1)}
        start = min(distance, key=distance.get)
        expected = set(range(start, start + n))
    skipped = run.trace["layer_skipped"].isel(sequence=0).values
    assert (skipped[0] == 0).all()  # the prefill runs (and measures) every layer
    assert {int(i) for i in np.flatnonzero(skipped[1])} == expected
    assert (skipped[1:] == skipped[1]).all()  # decided once per sequence

    decoder = embedded.hf.get_decoder()
    full = decoder.layers
    cache = DynamicCache(config=embedded.hf.config)
    tokens = []
    with torch.no_grad():
        logits = embedded.hf(input_ids=ids, **{embedded.cache_keyword: cache}, use_cache=True).logits[0, -1]
        tokens.append(int(logits.argmax()))
        decoder.layers = torch.nn.ModuleList([layer for i, layer in enumerate(full) if i not in expected])
        try:
            for _ in range(7):
                position = ids.shape[1] + len(tokens) - 1
                logits = embedded.hf(input_ids=torch.tensor([[tokens[-1]]]), **{embedded.cache_keyword: cache}, use_cache=True,
                                     position_ids=torch.tensor([[position]])).logits[0, -1]
                tokens.append(int(logits.argmax()))
        finally:
            decoder.layers = full
    assert list(run.token_ids) == tokens


def test_layer_skip_router_runs_on_dense_models_and_share_zero_changes_nothing(embedded):
    native = wb.generate(embedded, PROMPT, max_new_tokens=8, ignore_eos=True)
    none = wb.generate(embedded, PROMPT, router=wb.routers.get("layer_skip", share=0.0), max_new_tokens=8,
                       ignore_eos=True)
    assert list(none.token_ids) == list(native.token_ids)
    with pytest.raises(WorkbenchError, match="no MoE routers"):
        wb.generate(embedded, PROMPT, router="top_k", max_new_tokens=2)


def test_layer_skip_router_composes_with_speculative_verify_passes(embedded):
    """A verify pass skips the chosen layers too: prompt lookup over the layer-skipped model gives that model's
    greedy tokens."""
    router = wb.routers.get("layer_skip", share=0.2)
    greedy = wb.generate(embedded, PROMPT, router=router, max_new_tokens=12, ignore_eos=True)
    lookup = wb.generate(embedded, PROMPT, router=router, decoder="prompt_lookup", max_new_tokens=12,
                         ignore_eos=True)
    assert list(lookup.token_ids) == list(greedy.token_ids)


def test_bad_layer_router_parameters_and_missing_records_are_one_line_errors(embedded):
    with pytest.raises(ParameterError, match="metric"):
        wb.routers.get("layer_skip", metric="cosine")
    with pytest.raises(ParameterError, match="share"):
        wb.routers.get("layer_skip", share=1.5)
    run = wb.generate(embedded, PROMPT, max_new_tokens=2)
    with pytest.raises(ParameterError, match="record='layers'"):
        early_exit(run.trace)
    assert "ShortGPT" in wb.routers.get("layer_skip").describe()


def test_layer_pictures_show_the_traces_data_and_ask_for_the_record(tiny_llama):
    """logit_lens plots early_exit's agreement per layer (each step's lens token against the last layer's,
    counted here from the raw variable); layer_similarity shows every prompt and generated token, skipped layers
    named in the hover."""
    run = wb.generate(tiny_llama, "one two three four", router=wb.routers.get("layer_skip", share=0.5),
                      max_new_tokens=6, ignore_eos=True, record="layers")
    tokens = run.trace["lens_token"].isel(sequence=0).values
    agreement = [(tokens[:, layer] == tokens[:, -1]).mean() for layer in range(tokens.shape[1])]
    curve = wb.viz.logit_lens(run).Overlay.I.Curve.I
    np.testing.assert_allclose(curve.data["agreement"], agreement)
    heat = wb.viz.layer_similarity(run).data
    assert len(heat) == (len(run.prompt_ids) + 5) * tiny_llama.num_layers
    skipped = run.trace["layer_skipped"].isel(sequence=0).values[1]
    generated = heat[heat["token_index"] >= len(run.prompt_ids)]
    for row in generated.itertuples():
        assert (row.skipped == "yes") == bool(skipped[row.layer])
        if row.skipped == "yes":
            assert row.similarity == pytest.approx(1.0, abs=1e-5)  # a skipped layer returns its input
    plain = wb.generate(tiny_llama, "one two", max_new_tokens=2)
    with pytest.raises(WorkbenchError, match="layers"):
        wb.viz.logit_lens(plain)
