"""Traces: what a run recorded, as an xarray.Dataset with named dimensions (see workbench.trace.dataset); every
recordable variable is declared once in workbench.trace.schema."""

from workbench.trace import schema
from workbench.trace.dataset import build_dataset, cache_alive, load_trace, save_trace, trace_config
from workbench.trace.recorder import RECORDABLE, Recorder, RecordSpec

__all__ = ["RECORDABLE", "Recorder", "RecordSpec", "build_dataset", "cache_alive", "load_trace", "save_trace",
           "trace_config", "schema"]
