"""Expert predictors on hand-built traces with answers worked out by hand, and Fate against its definition."""

import numpy as np
import torch

import workbench as wb
from workbench.routers import prediction
from workbench.routers.events import routing_events

# 4 tokens, 2 layers, k = 1
EVENTS = np.array([[[0], [2]],
                   [[1], [3]],
                   [[0], [2]],
                   [[0], [3]]])


def test_previous_token():
    predicted = prediction.previous_token(EVENTS)
    assert (predicted[0] == -1).all()
    assert predicted[1:, :, 0].tolist() == [[0, 2], [1, 3], [0, 2]]
    precision, recall = prediction.precision_recall(predicted, EVENTS)
    # layer 0: guesses 0,1,0 for 1,0,0 -> 1 right of 3; layer 1: 2,3,2 for 3,2,3 -> 0 right
    assert np.allclose(precision, [1 / 3, 0]) and np.allclose(recall, [1 / 3, 0])


def test_frequency_online_and_calibrated():
    online = prediction.frequency(EVENTS, k=1)
    # layer 0 counts before t=1: {0:1} -> 0; t=2: {0:1,1:1} -> 0 (tie to the lower id); t=3: {0:2,1:1} -> 0
    assert online[1:, 0, 0].tolist() == [0, 0, 0]
    calibrated = prediction.frequency(EVENTS, calibration=np.array([[[1], [3]]] * 3), k=1)
    assert (calibrated[:, 0, 0] == 1).all() and (calibrated[:, 1, 0] == 3).all()


def test_transition_learns_the_affinity():
    # in calibration, expert 0 at layer 0 is always followed by 2 at layer 1, expert 1 by 3
    calibration = np.array([[[0], [2]], [[1], [3]], [[0], [2]]])
    predicted = prediction.transition(EVENTS, calibration, k=1)
    assert (predicted[:, 0] == -1).all()  # the first MoE layer has no layer before it
    assert predicted[:, 1, 0].tolist() == [2, 3, 2, 2]
    precision, _ = prediction.precision_recall(predicted, EVENTS)
    assert precision[1] == 3 / 4


def test_dense_layers_are_skipped():
    events = np.concatenate([np.full((4, 1, 1), -1), EVENTS], axis=1)  # a dense layer 0
    predicted = prediction.transition(events, events, k=1)
    assert (predicted[:, 1] == -1).all()  # layer 1 is the first MoE layer
    precision, recall = prediction.precision_recall(predicted, events)
    assert np.isnan(precision[0]) and np.isnan(recall[0])


def test_fate_is_the_previous_router_input_through_the_next_router():
    model = wb.models.tiny("mixtral", num_hidden_layers=3)
    run = wb.generate(model, "fate", max_new_tokens=4, ignore_eos=True, record="routing")
    inputs = {}
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a[0]))
             for i, layer in enumerate(model.hf.model.layers)]
    ids = model.encode("fate")[0].tolist() + run.token_ids[:-1]
    with torch.no_grad():
        model.hf(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    fate = prediction.fate(run.trace)
    assert (fate[:, 0] == -1).all()
    for layer in (1, 2):
        router = model.hf.model.layers[layer].mlp.gate
        expected = router(inputs[layer - 1].reshape(len(ids), -1))[2]
        assert [set(r) for r in fate[:, layer].tolist()] == [set(r) for r in expected.tolist()]
    actual = routing_events(run.trace)
    assert actual.shape == fate.shape == (len(ids), 3, 2)
