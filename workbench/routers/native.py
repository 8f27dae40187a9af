"""`native`: the model's own routing, untouched (top-k softmax/sigmoid gates in MoE models; nothing in dense ones)."""

from __future__ import annotations

from dataclasses import dataclass

from workbench.routers.base import Router


@dataclass
class Native(Router):
    name = "native"
    summary = "Use the model's own routing unchanged (MoE top-k gates; dense models have none)."
    paper = None
    needs_moe = False  # a dense model runs with it too
