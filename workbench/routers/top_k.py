"""`top_k`: run an MoE model with another number of active experts per token."""

from __future__ import annotations

from dataclasses import dataclass

from workbench.errors import ParameterError
from workbench.registry import param
from workbench.routers.base import Router, RouterCall, Routing


@dataclass
class TopK(Router):
    """The model's own router at another k: its scoring and weighting rules unchanged (Mixtral renormalises the
    k probabilities, GPT-OSS takes a softmax over the k logits, ...), only the number of experts differs. Fewer
    experts cost less compute and quality; `record="fidelity"` gives the KL against the native routing."""

    name = "top_k"
    summary = "Route each token to k experts (the model's own router at another k)."
    paper = "Switch / GShard top-k routing (Fedus et al., JMLR 2022; Lepikhin et al., ICLR 2021)"

    k: int = param(1, "active experts per token", min=1)

    def route(self, call: RouterCall) -> Routing:
        if self.k > call.num_experts:
            raise ParameterError(f"top_k k={self.k} is more than the {call.num_experts} experts of layer "
                                 f"{call.layer}; choose 1..{call.num_experts}")
        return call.rerun(top_k=self.k)
