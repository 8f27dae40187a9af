"""A routing trace as time-ordered token-layer events: what expert caches, predictors and consistency metrics read.

A run's trace (record="routing") holds the prompt's routing (`prompt_expert_ids`, query x layer x rank) and each
step's (`expert_ids`, step x layer x rank: the query that chose the token, so step 0's is the prompt's last
token). `routing_events` joins them into one array (tokens, layer, rank) in the order the model routed them, each
token once; -1 marks dense layers and unused ranks.
"""

from __future__ import annotations

import numpy as np

from workbench.errors import ParameterError


def routing_events(trace, name: str = "expert_ids", prompt: bool = True) -> np.ndarray:
    """(tokens, layers, rank) expert ids of every token the model routed, in order. `name`: "expert_ids",
    "fate_expert_ids" (the same layout) or "router_entropy" (tokens, layers); `prompt=False` keeps the generated
    part only (from step 1 on)."""
    if name not in trace:
        raise ParameterError(f"the trace has no {name!r}: run with record='routing' on an MoE model "
                             "(wb.moefy(model) makes the embedded model one)")
    steps = sequence_values(trace, name)
    if steps.shape[0] == 0:
        return steps
    if not prompt:
        return steps[1:]
    prompt_rows = sequence_values(trace, f"prompt_{name}")
    if steps.ndim == 2:  # a (token, layer) variable such as router_entropy: nothing to widen
        return np.concatenate([prompt_rows, steps[1:]])
    rank = max(prompt_rows.shape[-1], steps.shape[-1])

    def widen(rows):
        return np.pad(rows, [(0, 0), (0, 0), (0, rank - rows.shape[-1])], constant_values=-1)

    return np.concatenate([widen(prompt_rows), widen(steps[1:])])  # step 0's query is the prompt's last row


def sequence_values(trace, name: str) -> np.ndarray:
    """A variable of the trace's first sequence (a whole trace, or one sequence of it)."""
    data = trace[name]
    return np.asarray(data.isel(sequence=0).values if "sequence" in data.dims else data.values)


def moe_layers(events: np.ndarray) -> list[int]:
    """The layers with any routed expert (dense layers of an MoE model are all -1)."""
    return [layer for layer in range(events.shape[1]) if (events[:, layer] >= 0).any()]
