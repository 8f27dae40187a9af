"""`drop`: mask chosen experts; tokens go to their best remaining ones."""

from __future__ import annotations

from dataclasses import dataclass

from workbench.errors import ParameterError
from workbench.registry import param
from workbench.routers.base import Router, RouterCall, Routing


def _ids(text: str | list | tuple, what: str) -> list[int]:
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    try:
        return [int(v) for v in str(text).replace(",", " ").split()]
    except ValueError:
        raise ParameterError(f"drop {what} are integers separated by commas, e.g. '0,3'; got {text!r}") from None


@dataclass
class Drop(Router):
    """Expert ablation: the listed experts are removed from the router's choice (their logits -inf) in the
    listed layers, and each token takes its k best remaining experts, weighted by the model's own rule. What
    removing an expert costs shows how specialised it is."""

    name = "drop"
    summary = "Remove chosen experts from routing (each token takes its best remaining ones)."
    paper = None

    experts: str = param("0", "experts to remove, e.g. '0,3'")
    layers: str = param("", "layers to remove them from, e.g. '0,1' (empty: every MoE layer)")

    def route(self, call: RouterCall) -> Routing | None:
        layers = _ids(self.layers, "layers")
        if layers and call.layer not in layers:
            return None
        dropped = _ids(self.experts, "experts")
        bad = [e for e in dropped if not 0 <= e < call.num_experts]
        if bad:
            raise ParameterError(f"drop experts {bad} out of range: layer {call.layer} has experts "
                                 f"0..{call.num_experts - 1}")
        if call.num_experts - len(set(dropped)) < call.top_k:
            raise ParameterError(f"drop leaves {call.num_experts - len(set(dropped))} experts, fewer than the "
                                 f"model's {call.top_k} per token")
        logits = call.native.logits.float().clone()
        logits[:, dropped] = float("-inf")
        return call.choose(logits.topk(call.top_k, dim=-1).indices)
