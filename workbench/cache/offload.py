"""`offload`: any cache policy with its stores in host memory (pinned), one layer at a time on the device.

    wb.cache.get("offload", inner="snapkv")                    # a registered name, its default parameters
    wb.cache.get("offload", inner=wb.cache.get("kivi", bits=4)) # or a built policy
    wb.cache.offloaded("kivi", bits=4)                          # the same, shorter

The scheme of transformers' OffloadedCache: the cache lives in host memory; while layer l computes, layer l+1 is
copied to the device on a side CUDA stream (prefetch), and a layer's device copy is dropped once the next layer
needs the device (workbench.cache.offload_store). The inner policy builds its cache and decides everything as it
would (the cache's `policy` is the inner one); only where the stores live changes, so tokens and logits are the
inner policy's exactly. `nbytes_by_component()` gives {"host": ..., "device": ...}.
On a CPU model the stores are in host memory already: offloading changes nothing (no copies; a one-time warning).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from workbench.cache.base import CachePolicy
from workbench.cache.kvcache import KVCache
from workbench.cache.offload_store import offload
from workbench.errors import ParameterError
from workbench.registry import param

_warned = False


@dataclass
class Offload(CachePolicy):
    name = "offload"
    summary = ("Any policy's stores in pinned host memory; on a GPU each layer is copied to the device when "
               "needed, the next one prefetched on a side stream (transformers' OffloadedCache). On CPU: no effect.")
    paper = "no paper: transformers' OffloadedCache (prefetch layer l+1 on a side stream while layer l computes)"
    departs = ("works over any store (dense, ragged, quantized, fp8) by moving every tensor the store holds, its "
               "policy statistics and positions included; the whole resident layer is copied back to the host when "
               "the next one is needed, changed or not (OffloadedCache does the same with keys and values); reads of "
               "a layer outside a forward pass (commit, rollback, recorders) bring it to the device too; on a CPU "
               "model it changes nothing")

    inner: str | CachePolicy = param("full", "the policy whose stores live in host memory: a registered name "
                                     "(default parameters) or a built policy")
    prefetch: bool = param(True, "copy the next layer to the device on a side CUDA stream while a layer computes")

    def validate(self) -> None:
        from workbench import cache as family  # the registry (this module is one of its members)

        if isinstance(self.inner, str) and self.inner == self.name or isinstance(self.inner, Offload):
            raise ParameterError("cache 'offload' parameter 'inner' is an offloaded cache already; name the policy "
                                 f"to offload, one of: {', '.join(n for n in family.available() if n != self.name)}")
        self.policy = family.get(self.inner)  # unknown names fail here, listing the registered ones

    # what a session asks the policy it was given is the inner policy's answer
    @property
    def needs_bridge(self) -> bool:
        return self.policy.needs_bridge

    @property
    def tentative(self) -> bool:
        return self.policy.tentative

    @property
    def acts_while_decoding(self) -> bool:
        return self.policy.acts_while_decoding

    def __getattr__(self, name):  # the inner policy's parameters (e.g. a budget), read through the wrapper
        policy = self.__dict__.get("policy")
        if policy is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(policy, name)

    def build(self, model, forward=None) -> KVCache:
        device = model.device
        cache = self.policy.build(model, forward)
        if device.type != "cuda":
            _warn_once(device)
        return offload(cache, device, "cuda" if device.type == "cuda" else "none", self.prefetch)

    def describe(self) -> str:
        text = super().describe() + f"\n  offloads: {self.policy.describe()}"
        if not torch.cuda.is_available():
            text += "\n  here: no CUDA device, so offloading changes nothing (the stores are in host memory already)"
        return text


def _warn_once(device) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"cache 'offload': the model is on {device}, whose memory is host memory: offloading changes "
                      "nothing (no copies, no prefetch)", RuntimeWarning, stacklevel=3)


def offloaded(policy: str | CachePolicy = "full", **params) -> Offload:
    """`policy` (a name with its parameters, or a built policy) with its stores offloaded to host memory."""
    from workbench import cache as family

    return Offload(inner=family.get(policy, **params))
