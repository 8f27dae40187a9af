"""workbench: a Jupyter-first research workbench for efficient LLM inference.

    import workbench as wb
    model = wb.load()                                  # embedded SmolLM2-135M-Instruct, offline
    run = wb.generate(model, "The capital of France is", record=["entropy", "cache"])
    run.text, run.tokens_per_s, run.trace              # trace: an xarray.Dataset
"""

from workbench import attention, cache, decode, routers, run, trace  # component registries, the run, traces
from workbench.errors import ModelLoadError, ParameterError, PromptError, UnknownComponentError, WorkbenchError
from workbench.families import FAMILIES
from workbench.models import Model, load, moefy, tiny, wrap
from workbench.run import ChunkCache, PrefixCache, Run, Session, StepEvent, ape, cacheblend, generate, use_attention
from workbench.trace import RECORDABLE, load_trace
from workbench.version import __version__

__all__ = ["attention", "cache", "decode", "routers", "run", "trace", "FAMILIES", "Model", "load", "moefy", "tiny",
           "wrap", "generate", "PrefixCache", "ChunkCache", "cacheblend", "ape", "Session", "use_attention", "Run",
           "StepEvent", "RECORDABLE", "load_trace", "WorkbenchError",
           "UnknownComponentError", "ParameterError", "PromptError", "ModelLoadError", "__version__"]


def __getattr__(name: str):
    """`wb.viz`, `wb.report`, `wb.sweep` and `wb.Workbench` import HoloViews/ipywidgets on first use, not at
    `import workbench`."""
    if name in ("viz", "report", "widgets"):
        import importlib

        return importlib.import_module(f"workbench.{name}")
    if name == "sweep":  # wb.sweep(...) runs a sweep; wb.sweep.table / .heatmap / .status are its tools
        from workbench.sweeps import sweep

        return sweep
    if name == "Workbench":
        from workbench.widgets import Workbench

        return Workbench
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
