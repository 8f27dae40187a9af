"""Driving a cache policy by hand, without a model forward pass: fill a layer with chosen keys, then run the
attention hooks on chosen queries. Used by the policy tests and handy in notebooks to see a policy decide."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def filled_cache(model, policy, keys: torch.Tensor, values: torch.Tensor | None = None):
    """A cache of `policy` whose layer 0 holds `keys` (kv_heads, n, head_dim), as after the prompt's update."""
    cache = policy.build(model)
    cache.bridged = True  # as inside workbench.generate: the policy may evict
    values = torch.randn_like(keys) if values is None else values
    cache.update(keys[None], values[None], 0)
    return cache


def fake_module(layer: int = 0, groups: int = 1) -> SimpleNamespace:
    """What an attention call's `module` must offer the hooks: its layer index and GQA group size."""
    return SimpleNamespace(layer_idx=layer, num_key_value_groups=groups)
