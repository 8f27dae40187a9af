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
        self._group: str | None = None  # the prompt the sample and prefill record below belong to
        self._sample = self._prefill = None

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
        from workbench.eval.harness import first_prompt, score
        from workbench.eval.prefill import PrefillRecord
        from workbench.families import FAMILIES

        config = cell.config
        model = self.model(config["model"])
        components = {family: FAMILIES[family].get(config[family]["name"], **config[family]["params"])
                      for family in FAMILIES if family in config}
        settings = config["settings"]
        if self._group != cell.group:  # a new prompt: free the last record first (it holds every layer's K/V)
            self._group, self._sample, self._prefill = None, None, None
            self._sample = cell.task.make(model.tokenizer, config["seed"])
            self._group = cell.group
        if settings.get("prefill") == "replay" and self._prefill is None:
            self._prefill = PrefillRecord.capture(model, first_prompt(model, self._sample), components["attention"])
        record = self._prefill if settings.get("prefill") == "replay" else None
        return score(model, self._sample, record=record, max_new_tokens=settings.get("max_new_tokens", 16),
                     chunk=settings.get("chunk", 1), **components)
