"""MoEfication (workbench.models.moefy): exactness at full top-k, the neuron partition, the HF MoE router/experts
conventions, partial top-k against an independent masked-dense reference, and clear errors."""

import pytest
import torch
from torch.nn import functional as F

import workbench as wb
from workbench.errors import ParameterError
from workbench.models.moefy import ACTIVATION_MARKERS, MoefiedExperts, MoefiedMLP, MoefiedRouter, SharedExpert, moefy

COMBINATIONS = [(c, r) for c in ("weights", "activations") for r in ("centroid", "cmoe")]
PROMPT = "The harbour town woke slowly; gulls argued over the nets while the ferry sounded twice."


@pytest.fixture(scope="module")
def dense():
    return wb.tiny("llama")


def _logits(model, ids):
    with torch.no_grad():
        return model.hf(input_ids=ids).logits


def _moefied_mlps(model):
    return [m for m in model.hf.modules() if isinstance(m, MoefiedMLP)]


def _dense_mlp_output(mlp, x, mask=None):
    """The original dense SwiGLU FFN, optionally restricted to the neurons where mask (tokens, intermediate) is 1."""
    h = mlp.act_fn(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    return (h if mask is None else h * mask) @ mlp.down_proj.weight.T


@pytest.mark.parametrize("clustering,router", COMBINATIONS)
def test_all_experts_active_computes_the_dense_model_and_leaves_it_untouched(dense, clustering, router):
    ids = dense.encode(PROMPT)
    before = {k: v.clone() for k, v in dense.hf.state_dict().items()}
    reference = _logits(dense, ids)
    moefied = moefy(dense, experts=8, top_k=8, clustering=clustering, router=router)
    torch.testing.assert_close(_logits(moefied, ids), reference, atol=1e-4, rtol=0)
    # the original: same modules, same weights, same logits, no MoEfication mark
    assert all(type(layer.mlp).__name__ == "LlamaMLP" for layer in dense.hf.model.layers)
    assert all(torch.equal(before[k], v) for k, v in dense.hf.state_dict().items())
    torch.testing.assert_close(_logits(dense, ids), reference, atol=0, rtol=0)
    assert not hasattr(dense.hf.config, "moefication")
    assert moefied.hf is not dense.hf and moefied.tokenizer is dense.tokenizer
    assert moefied.name == "tiny-llama moefied e8k8"
    expected = {"experts": 8, "top_k": 8, "clustering": clustering, "router": router, "seed": 0, "shared": 0.0}
    assert moefied.hf.config.moefication == expected and moefied.info["moefication"] == expected


def test_experts_partition_the_neurons_into_equal_slices_of_the_dense_weights(dense):
    moefied = moefy(dense, experts=8, top_k=2)
    for layer, mlp in zip(dense.hf.model.layers, _moefied_mlps(moefied)):
        experts = mlp.experts
        assert mlp.shared_expert is None  # shared=0 (the default): every neuron is routed
        assert isinstance(experts, MoefiedExperts) and experts.neuron_index.shape == (8, 32)
        assert torch.equal(experts.neuron_index.flatten().sort().values, torch.arange(256))
        assert experts.gate_up_proj.shape == (8, 64, 128) and experts.down_proj.shape == (8, 128, 32)
        for e, neurons in enumerate(experts.neuron_index):
            assert torch.equal(experts.gate_up_proj[e, :32], layer.mlp.gate_proj.weight[neurons])
            assert torch.equal(experts.gate_up_proj[e, 32:], layer.mlp.up_proj.weight[neurons])
            assert torch.equal(experts.down_proj[e], layer.mlp.down_proj.weight[:, neurons])


@pytest.mark.parametrize("router", ["centroid", "cmoe"])
def test_router_follows_mixtral_top_k_router_conventions(dense, router):
    moefied = moefy(dense, experts=8, top_k=3, router=router)
    gate = _moefied_mlps(moefied)[0].gate
    assert isinstance(gate, MoefiedRouter) and (gate.num_experts, gate.top_k) == (8, 3)
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(1))
    logits, weights, index = gate(x)  # (..., hidden) is flattened to tokens like MixtralTopKRouter does
    mixtral = wb.tiny("mixtral").hf.model.layers[0].mlp.gate
    m_logits, m_weights, m_index = mixtral(x)
    assert logits.shape == (10, 8) and weights.shape == index.shape == (10, 3)
    assert (logits.ndim, weights.ndim, index.ndim) == (m_logits.ndim, m_weights.ndim, m_index.ndim)
    assert index.dtype == m_index.dtype == torch.int64 and logits.dtype == x.dtype
    assert weights.dtype == x.dtype and torch.equal(weights, torch.ones_like(weights))  # a plain sum of experts
    torch.testing.assert_close(logits.gather(1, index), logits.topk(3, dim=-1).values, atol=0, rtol=0)
    gate.top_k = 5  # changeable at run time
    assert gate(x)[2].shape == (10, 5) and gate(x)[1].shape == (10, 5)
    with pytest.raises(ParameterError, match=r"1\.\.8"):
        gate.top_k = 9
    # where HF MoE blocks keep their router: <layer>.mlp.gate
    assert [n for n, m in moefied.hf.named_modules() if isinstance(m, MoefiedRouter)] == [
        f"model.layers.{i}.mlp.gate" for i in range(dense.num_layers)]


@pytest.mark.parametrize("clustering,router", [("weights", "centroid"), ("activations", "cmoe")])
def test_partial_top_k_is_the_sum_of_the_selected_experts_dense_slices(dense, clustering, router):
    moefied = moefy(dense, experts=8, top_k=3, clustering=clustering, router=router)
    x = torch.randn(1, 7, 128, generator=torch.Generator().manual_seed(2))
    for layer, mlp in zip(dense.hf.model.layers, _moefied_mlps(moefied)):
        for top_k in (3, 1):
            mlp.gate.top_k = top_k
            logits, _, index = mlp.gate(x)
            assert torch.equal(index.sort(-1).values, logits.topk(top_k, dim=-1).indices.sort(-1).values)
            # reference from the ORIGINAL dense weights: keep only the selected experts' neurons, token by token
            mask = _selected_neurons(mlp, index)
            reference = _dense_mlp_output(layer.mlp, x[0], mask)
            with torch.no_grad():
                torch.testing.assert_close(mlp(x)[0], reference, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(reference, _dense_mlp_output(layer.mlp, x[0]), atol=1e-3)


def _selected_neurons(mlp, index, neurons=256):
    """(tokens, neurons) 1 where a token uses a neuron: its selected experts' neurons and the shared ones."""
    mask = torch.zeros(index.shape[0], neurons)
    if mlp.shared_expert is not None:
        mask[:, mlp.shared_expert.neuron_index] = 1
    for token in range(index.shape[0]):
        mask[token, mlp.experts.neuron_index[index[token]].flatten()] = 1
    return mask


@pytest.mark.parametrize("implementation", ["batched_mm", "grouped_mm"])
def test_transformers_experts_implementations_run_the_moefied_experts(dense, implementation):
    moefied = moefy(dense, experts=8, top_k=4)
    ids = dense.encode(PROMPT)
    eager = _logits(moefied, ids)
    moefied.hf.config._experts_implementation = implementation
    other = _logits(moefied, ids)  # both run on CPU with the locked torch
    torch.testing.assert_close(other, eager, atol=1e-4, rtol=1e-4)


def test_moefied_model_generates_like_the_dense_one_with_all_experts(dense):
    ids = dense.encode(PROMPT)
    moefied = moefy(dense, experts=4, top_k=4)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(moefied.hf.generate(ids, **settings), dense.hf.generate(ids, **settings))


def test_same_seed_same_experts(dense):
    first, again = moefy(dense, experts=8, seed=3), moefy(dense, experts=8, seed=3)
    for a, b in zip(_moefied_mlps(first), _moefied_mlps(again)):
        assert torch.equal(a.experts.neuron_index, b.experts.neuron_index)
        assert torch.equal(a.gate.weight, b.gate.weight)


def test_centroid_router_scores_by_the_mean_normalised_gate_row(dense):
    moefied = moefy(dense, experts=4, top_k=2)
    layer, mlp = dense.hf.model.layers[0], _moefied_mlps(moefied)[0]
    rows = F.normalize(layer.mlp.gate_proj.weight, dim=1)
    centers = torch.stack([rows[n].mean(0) for n in mlp.experts.neuron_index])
    torch.testing.assert_close(mlp.gate.weight, centers)


def test_bad_parameters_raise_one_line_errors(dense):
    cases = [(dict(experts=7), r"experts=7 must divide the intermediate size 256; allowed: 1, 2, 4, 8, 16"),
             (dict(experts=8, top_k=0), r"top_k=0 must be an integer in 1\.\.8"),
             (dict(experts=8, top_k=9), r"top_k=9 must be an integer in 1\.\.8"),
             (dict(clustering="spectral"), r"clustering 'spectral' is not known; use one of weights, activations"),
             (dict(router="learned"), r"router 'learned' is not known; use one of centroid, cmoe"),
             (dict(calibration="some text"),
              r"calibration is only used by clustering='activations' or shared > 0"),
             (dict(clustering="activations", calibration=3), r"calibration must be text, token ids or None")]
    for kwargs, message in cases:
        with pytest.raises(ParameterError, match=message) as info:
            moefy(dense, **kwargs)
        assert "\n" not in str(info.value)


def test_calibration_may_be_text_or_token_ids(dense):
    text = "Boats, nets and gulls: a short calibration text of our own."
    from_text = moefy(dense, experts=8, clustering="activations", calibration=text)
    from_ids = moefy(dense, experts=8, clustering="activations", calibration=dense.tokenizer(text)["input_ids"])
    default = moefy(dense, experts=8, clustering="activations")
    index = [_moefied_mlps(m)[0].experts.neuron_index for m in (from_text, from_ids, default)]
    assert torch.equal(index[0], index[1]) and not torch.equal(index[0], index[2])


def test_already_moe_models_are_refused():
    with pytest.raises(wb.WorkbenchError, match="dense SwiGLU"):
        moefy(wb.tiny("mixtral"))


def test_weights_for_an_arbitrary_expert_set_are_ones_with_zeros_for_unused_slots(dense):
    mlp = _moefied_mlps(moefy(dense, experts=8, top_k=3))[0]
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(4))
    logits, weights, index = mlp.gate(x)
    torch.testing.assert_close(mlp.gate.weights_for(logits, index), weights, atol=0, rtol=0)  # its own choice
    chosen = torch.tensor([[0, 2, -1], [5, -1, -1], [1, 3, 7]])
    expected = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    torch.testing.assert_close(mlp.gate.weights_for(logits, chosen), expected, atol=0, rtol=0)
    assert mlp.gate.weights_for(logits.to(torch.bfloat16), chosen).dtype == torch.bfloat16  # the hidden dtype
    # the experts with such a routing (unused slots filled with a used expert, as workbench.routers' Routing does)
    filled = torch.where(chosen < 0, chosen[:, :1], chosen)
    with torch.no_grad():
        out = mlp.experts(x, filled, mlp.gate.weights_for(logits, chosen))
    layer = dense.hf.model.layers[0]
    mask = torch.zeros(3, 256)
    for token in range(3):
        mask[token, mlp.experts.neuron_index[chosen[token][chosen[token] >= 0]].flatten()] = 1
    torch.testing.assert_close(out, _dense_mlp_output(layer.mlp, x, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("clustering,router", COMBINATIONS)
def test_shared_expert_with_all_routed_experts_computes_the_dense_model(dense, clustering, router):
    ids = dense.encode(PROMPT)
    moefied = moefy(dense, experts=8, top_k=8, clustering=clustering, router=router, shared=0.25)
    torch.testing.assert_close(_logits(moefied, ids), _logits(dense, ids), atol=1e-4, rtol=0)
    expected = {"experts": 8, "top_k": 8, "clustering": clustering, "router": router, "seed": 0, "shared": 0.25}
    assert moefied.hf.config.moefication == expected and moefied.info["moefication"] == expected
    assert moefied.name == "tiny-llama moefied e8k8s0.25"
    assert all(mlp.intermediate_size == 256 for mlp in _moefied_mlps(moefied))


def _cmoe_activation_rates(mlp, x):
    """CMoE's rule, written out: h = act(x^ . g^) * (x^ . u^) (all L2-normalised); a neuron's rate is the fraction
    of tokens that have it among their ACTIVATION_MARKERS largest |h|."""
    x = F.normalize(x, dim=-1)
    h = mlp.act_fn(x @ F.normalize(mlp.gate_proj.weight, dim=1).T) * (x @ F.normalize(mlp.up_proj.weight, dim=1).T)
    counts = torch.zeros(h.shape[1])
    for row in h.abs():
        counts[row.argsort(descending=True)[:ACTIVATION_MARKERS]] += 1
    return counts / h.shape[0]


def test_shared_neurons_and_experts_partition_the_neurons_and_the_shared_are_the_most_active(dense):
    text = "Nets, gulls and ferries: the calibration text of this test, long enough to count activations on."
    moefied = moefy(dense, experts=8, top_k=2, shared=0.25, calibration=text)
    inputs = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, args, i=i: inputs.__setitem__(i, args[0][0]))
             for i, layer in enumerate(dense.hf.model.layers)]
    try:
        _logits(dense, torch.tensor([dense.tokenizer(text)["input_ids"]]))
    finally:
        for hook in hooks:
            hook.remove()
    for i, (layer, mlp) in enumerate(zip(dense.hf.model.layers, _moefied_mlps(moefied))):
        shared, experts = mlp.shared_expert, mlp.experts
        assert isinstance(shared, SharedExpert) and shared.neuron_index.shape == (64,)
        assert experts.neuron_index.shape == (8, 24) and experts.gate_up_proj.shape == (8, 48, 128)
        everything = torch.cat([shared.neuron_index, experts.neuron_index.flatten()])
        assert torch.equal(everything.sort().values, torch.arange(256))
        assert torch.equal(shared.gate_proj.weight, layer.mlp.gate_proj.weight[shared.neuron_index])
        assert torch.equal(shared.up_proj.weight, layer.mlp.up_proj.weight[shared.neuron_index])
        assert torch.equal(shared.down_proj.weight, layer.mlp.down_proj.weight[:, shared.neuron_index])
        for e, neurons in enumerate(experts.neuron_index):
            assert torch.equal(experts.gate_up_proj[e, :24], layer.mlp.gate_proj.weight[neurons])
            assert torch.equal(experts.down_proj[e], layer.mlp.down_proj.weight[:, neurons])
        with torch.no_grad():
            rates = _cmoe_activation_rates(layer.mlp, inputs[i])
        assert rates[shared.neuron_index].min() >= rates[experts.neuron_index.flatten()].max()
        assert rates[shared.neuron_index].sum() > 0


@pytest.mark.parametrize("clustering,router", [("weights", "centroid"), ("activations", "cmoe")])
def test_partial_top_k_with_shared_adds_the_shared_neurons_to_the_selected_experts(dense, clustering, router):
    moefied = moefy(dense, experts=8, top_k=3, clustering=clustering, router=router, shared=0.25)
    x = torch.randn(1, 7, 128, generator=torch.Generator().manual_seed(5))
    for layer, mlp in zip(dense.hf.model.layers, _moefied_mlps(moefied)):
        for top_k in (3, 1):
            mlp.gate.top_k = top_k
            _, _, index = mlp.gate(x)
            mask = _selected_neurons(mlp, index)  # the shared neurons always on
            reference = _dense_mlp_output(layer.mlp, x[0], mask)
            with torch.no_grad():
                torch.testing.assert_close(mlp(x)[0], reference, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(reference, _dense_mlp_output(layer.mlp, x[0]), atol=1e-3)


def test_bad_shared_values_raise_one_line_errors(dense):
    cases = [(dict(shared=-0.1), r"shared=-0\.1 must be a fraction of the neurons in \[0, 1\)"),
             (dict(shared=1.0), r"shared=1\.0 must be a fraction of the neurons in \[0, 1\)"),
             (dict(shared=1.5), r"shared=1\.5 must be a fraction"),
             (dict(shared="a quarter"), r"shared='a quarter' must be a fraction"),
             (dict(shared=True), r"shared=True must be a fraction"),
             (dict(shared=0.001), r"shared=0\.001 is less than one of the 256 neurons"),
             (dict(experts=8, shared=0.3),
              r"experts=8 must divide the 179 neurons left after shared=0\.3 \(77 of 256\); allowed: 1, 179")]
    for kwargs, message in cases:
        with pytest.raises(ParameterError, match=message) as info:
            moefy(dense, **kwargs)
        assert "\n" not in str(info.value)
    moefy(dense, experts=16, top_k=2, shared=0.5)  # 16 does divide 128: no error
    moefy(dense, experts=8, clustering="weights", shared=0.25, calibration="text for the shared neurons only")


@pytest.mark.embedded
def test_embedded_model_with_all_experts_active_matches_dense(embedded):
    ids = embedded.encode(PROMPT)
    moefied = moefy(embedded, experts=16, top_k=16)
    assert moefied.name == "SmolLM2-135M-Instruct moefied e16k16"
    mlps = _moefied_mlps(moefied)
    assert len(mlps) == 30 and mlps[0].experts.neuron_index.shape == (16, 96)
    torch.testing.assert_close(_logits(moefied, ids), _logits(embedded, ids), atol=1e-4, rtol=0)


@pytest.mark.embedded
def test_embedded_model_with_a_shared_expert_and_all_routed_experts_matches_dense(embedded):
    ids = embedded.encode(PROMPT)
    moefied = moefy(embedded, experts=16, top_k=16, shared=0.25)
    mlps = _moefied_mlps(moefied)
    assert mlps[0].shared_expert.neuron_index.shape == (384,) and mlps[0].experts.neuron_index.shape == (16, 72)
    torch.testing.assert_close(_logits(moefied, ids), _logits(embedded, ids), atol=1e-4, rtol=0)
