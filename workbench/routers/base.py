"""Routers: which parameters a token goes through (MoE expert choice, layer skipping)."""

from __future__ import annotations

from contextlib import contextmanager

from workbench.registry import Component


class Router(Component):
    """Base of routers. `attached(model)` is a context manager that changes (or observes) routing during a run
    and restores the model afterwards."""

    @contextmanager
    def attached(self, model):
        yield


def moe_gates(hf_model) -> dict[str, object]:
    """The router ("gate") modules of a mixture-of-experts model, by qualified name; empty for dense models."""
    return {name: module for name, module in hf_model.named_modules()
            if name.endswith(("mlp.gate", "block_sparse_moe.gate")) and not name.endswith("proj")}
