"""Routing traces (record="routing") against transformers' own `output_router_logits` on tiny MoE models."""

import numpy as np
import pytest
import torch

import workbench as wb
from workbench.errors import WorkbenchError

MODELS = {
    "mixtral": dict(family="mixtral"),
    "qwen3_moe": dict(family="qwen3_moe"),
    # three layers, the first dense (Qwen3-MoE's mlp_only_layers): its routing is missing, not an error
    "qwen3_moe dense layer": dict(family="qwen3_moe", num_hidden_layers=3, mlp_only_layers=[0]),
}


def _reference(model, ids: list[int]):
    """Per position and layer: the top-k experts of softmax(router logits) by transformers' own router output
    (unmodified model, no workbench), as sets; None for dense layers. Also the router entropies."""
    hf = model.hf
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_router_logits=True)
    sparse = [i for i in range(model.num_layers) if type(hf.model.layers[i].mlp).__name__.endswith("MoeBlock")]
    assert len(sparse) == len(out.router_logits)
    k = hf.config.num_experts_per_tok
    chosen = {layer: torch.softmax(logits.float(), -1).topk(k, -1).indices for layer, logits in
              zip(sparse, out.router_logits)}
    entropy = {layer: torch.special.entr(torch.softmax(logits.float(), -1)).sum(-1) for layer, logits in
               zip(sparse, out.router_logits)}
    return chosen, entropy


@pytest.mark.parametrize("name", list(MODELS))
def test_routing_trace_equals_transformers_router_logits(name):
    settings = dict(MODELS[name])
    model = wb.models.tiny(settings.pop("family"), **settings)
    run = wb.generate(model, "the experts of a token", max_new_tokens=6, ignore_eos=True,
                      record=["routing", "router_logits"])
    trace = run.trace
    prompt = model.encode("the experts of a token")[0].tolist()
    ids = prompt + run.token_ids[:-1]  # the last token was never fed
    chosen, entropy = _reference(model, ids)
    n_prompt = len(prompt)
    prompt_ids = trace.prompt_expert_ids.values[0]  # (query, layer, rank)
    step_ids = trace.expert_ids.values[0]  # (step, layer, rank): the query before each token
    for layer in range(model.num_layers):
        if layer not in chosen:
            assert (prompt_ids[:, layer] == -1).all() and (step_ids[:, layer] == -1).all()
            assert np.isnan(trace.router_entropy.values[0, :, layer]).all()
            continue
        for position in range(len(ids)):
            expected = set(chosen[layer][position].tolist())
            if position < n_prompt:
                assert set(prompt_ids[position, layer].tolist()) == expected
            step = position - (n_prompt - 1)
            if step >= 0:
                assert set(step_ids[step, layer].tolist()) == expected
                assert trace.router_entropy.values[0, step, layer] == pytest.approx(
                    float(entropy[layer][position]), rel=1e-4)
                # highest router logit first
                logits = trace.router_logits.values[0, step, layer]
                ranked = logits[step_ids[step, layer]]
                assert (np.diff(ranked) <= 0).all()


def test_mixtral_weights_are_the_renormalised_top_k():
    model = wb.models.tiny("mixtral")
    run = wb.generate(model, "weights", max_new_tokens=3, ignore_eos=True, record=["routing", "router_logits"])
    logits = torch.tensor(run.trace.router_logits.values[0])  # (step, layer, expert)
    probs = torch.softmax(logits, -1)
    ids = torch.tensor(run.trace.expert_ids.values[0])
    picked = probs.gather(-1, ids)
    expected = picked / picked.sum(-1, keepdim=True)  # Mixtral renormalises its top-k probabilities
    assert np.allclose(run.trace.expert_weights.values[0], expected.numpy(), atol=1e-5)


def test_dense_model_records_no_routing_and_refuses_moe_routers():
    model = wb.models.tiny("llama")
    run = wb.generate(model, "dense", max_new_tokens=2, ignore_eos=True, record="routing")
    assert "expert_ids" not in run.trace
    assert not wb.routers.find_routers(model.hf)

    class Changes(wb.routers.Router):
        name = "changes"

    with pytest.raises(WorkbenchError, match="no MoE routers"):
        wb.run.Session(model, router=Changes())


def test_routing_not_recorded_leaves_the_model_untouched():
    """Without an observer or a routing policy the bridge is not entered; a user's own forward is never routed."""
    model = wb.models.tiny("mixtral")
    ids = model.encode("plain")
    with torch.no_grad():
        before = model.hf(ids).logits
    wb.generate(model, "plain", max_new_tokens=2, record="routing")
    with torch.no_grad():
        after = model.hf(ids).logits
    assert torch.equal(before, after)
