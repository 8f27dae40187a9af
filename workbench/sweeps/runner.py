"""Run cells in one process: load each model once, share a prompt's full-cache prefill between the cells that
replay it, and turn every outcome - measures or an exception - into a record the store can keep."""

from __future__ import annotations

import os
import socket
import time
import traceback
from typing import Any

from workbench.sweeps.grid import Cell


class CellRunner:
    """What a worker holds: loaded models (by name) and the newest prefill record.

    models -- already loaded models by name (a notebook's model, say); others are loaded on first use
    threads -- torch CPU threads for this process (None: leave torch's choice)"""

    def __init__(self, models: dict[str, Any] | None = None, threads: int | None = None):
        import transformers

        transformers.logging.set_verbosity_error()
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.models = dict(models or {})
        self._prefill: tuple[str, Any] | None = None  # (group, PrefillRecord)
        self._samples: dict[str, Any] = {}  # group -> sample (a group is one prompt)

    def model(self, name: str):
        if name not in self.models:
            import workbench as wb

            self.models[name] = wb.load(None if name == "embedded" else name)
        return self.models[name]

    def run(self, cell: Cell) -> dict[str, Any]:
        """The cell's record: status "done" with its measures, or "failed" with the error and its traceback."""
        started = time.perf_counter()
        try:
            metrics, reply = self._score(cell)
            record = {"status": "done", "metrics": metrics, "reply": reply, "error": None}
        except Exception as error:  # a failing cell is recorded, not fatal: the sweep goes on
            record = {"status": "failed", "metrics": {}, "reply": "", "error": f"{type(error).__name__}: {error}",
                      "traceback": traceback.format_exc(limit=-6)}
        record.update(key=cell.key, config=cell.config, seconds=time.perf_counter() - started,
                      worker=f"{socket.gethostname()}:{os.getpid()}", finished=time.time())
        return record

    def _score(self, cell: Cell) -> tuple[dict, str]:
        from workbench.eval.harness import score
        from workbench.eval.multiturn import prompt_ids
        from workbench.families import FAMILIES

        config = cell.config
        model = self.model(config["model"])
        components = {family: FAMILIES[family].get(config[family]["name"], **config[family]["params"])
                      for family in FAMILIES if family in config}
        sample = self._samples.get(cell.group)
        if sample is None:
            self._samples = {cell.group: cell.task.make(model.tokenizer, config["seed"])}  # one prompt at a time
            sample = self._samples[cell.group]
        settings = config["settings"]
        record = None
        if settings.get("prefill") == "replay":
            if self._prefill is None or self._prefill[0] != cell.group:
                from workbench.eval.prefill import PrefillRecord

                self._prefill = None  # free the last one first: a record holds every layer's keys and values
                ids = sample.context_ids if sample.kind == "perplexity" else prompt_ids(model, sample)
                self._prefill = (cell.group, PrefillRecord.capture(model, ids, components["attention"]))
            record = self._prefill[1]
        metrics, reply = score(model, sample, record=record, max_new_tokens=settings.get("max_new_tokens", 16),
                               chunk=settings.get("chunk", 1), **components)
        return metrics, reply
