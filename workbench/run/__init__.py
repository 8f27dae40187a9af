"""The generation loop that wires a model, components and the recorder together."""

from workbench.run.generate import generate
from workbench.run.result import Run, StepEvent

__all__ = ["generate", "Run", "StepEvent"]
