"""The router bridge: a session's Router component and observer, bound to the MoE routers of its forward passes.

Every router of a model (workbench.routers.find_routers: found by class) gets one forward hook, installed the
first time a session runs on the model and left in place. The hook does nothing unless a session's pass is
running in the same thread: `bound(binding)` sets the pass's binding in a context variable for the duration of
the forward, so two sessions on one model (a draft and a target, the panel's thread and a notebook cell) never
see each other's router or observer, and a user's own `model.hf(...)` call in between is untouched.

In the hook: the model's router has computed its choice; the binding's Router may replace it (`route`), the
observer receives what the experts will use (`observe_routing`), and the MoE block gets it back.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from workbench.routers.base import Router, RouterCall, Routing, find_routers


@dataclass
class RouterBinding:
    """What one session binds to a pass's router calls."""

    router: Router
    observer: Any  # has observe_routing(call, routing), or None
    phase: str
    state: dict  # the session's router state

    following: dict  # layer -> (the next MoE layer, its router), from `following_routers`

    def __call__(self, layer: int, module, args, output):
        call = RouterCall(layer, module, args[0].reshape(-1, args[0].shape[-1]), self.phase, Routing(*output),
                          self.state, self.following.get(layer))
        routing = self.router.route(call)
        if self.observer is not None:
            self.observer.observe_routing(call, routing or call.native)
        return None if routing is None else routing.as_output()


_current: ContextVar[RouterBinding | None] = ContextVar("workbench_router_binding", default=None)
_hooked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # hf model -> {layer: router}
_following: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # hf model -> {layer: (next layer, router)}


def routers(hf_model) -> dict:
    """The model's routers by layer, hooked (once per model)."""
    if hf_model not in _hooked:
        found = find_routers(hf_model)
        for layer, module in found.items():
            module.register_forward_hook(_hook(layer))
        _hooked[hf_model] = found
        layers = sorted(found)
        _following[hf_model] = {layer: (later, found[later]) for layer, later in zip(layers, layers[1:])}
    return _hooked[hf_model]


def following_routers(hf_model) -> dict:
    """Each MoE layer's next MoE layer and its router (the last MoE layer has none)."""
    routers(hf_model)
    return _following[hf_model]


def _hook(layer: int):
    def hook(module, args, output):
        binding = _current.get()
        return None if binding is None else binding(layer, module, args, output)
    return hook


@contextmanager
def bound(hf_model, binding: RouterBinding | None):
    """Route the block's forward passes (in this thread) through `binding`; None: the model's own routing,
    unobserved."""
    if binding is None or not routers(hf_model):
        yield
        return
    token = _current.set(binding)
    try:
        yield
    finally:
        _current.reset(token)
