"""Where cells run: in this process (serial), or on Ray actors - a local cluster of N worker processes, or an
existing cluster by address. Either way every finished cell comes back to the caller's `done(record)` at once,
which writes it to the store, so a crash loses only the cells in flight.

On Ray each actor loads the model once and runs many cells. Cells that share a prompt (one group) go to one actor
in a row, so the prompt's full-cache prefill is computed once and replayed into every cache, as in the serial run.
An actor whose process dies is replaced and its cell rescheduled; a cell that kills its worker `attempts` times is
recorded as failed. Ray Core (actors and `ray.wait`) is enough here: Ray Tune would add trial directories,
searchers and its own result format on top of a plain grid whose cells are already keyed and stored.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any, Callable

from workbench.sweeps.grid import Cell
from workbench.sweeps.runner import CellRunner

Done = Callable[[dict[str, Any]], None]


def run_serial(cells: list[Cell], done: Done, models: dict[str, Any] | None = None) -> None:
    runner = CellRunner(models)
    for cell in _ordered(cells):
        done(runner.run(cell))


def _ordered(cells: list[Cell]) -> list[Cell]:
    """Cells of one group next to each other, groups in the order they first appear."""
    return [cell for group in _groups(cells) for cell in group]


def _groups(cells: list[Cell]) -> list[list[Cell]]:
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.group, []).append(cell)
    return list(groups.values())


def local_threads(workers: int) -> int:
    """torch threads per worker so that `workers` processes share this machine's cores without oversubscribing."""
    return max(1, (os.cpu_count() or 1) // workers)


def run_ray(cells: list[Cell], done: Done, *, workers: int | None, address: str | None,
            cpus_per_worker: int | None = None, gpus_per_worker: float = 0, attempts: int = 2,
            report: Callable[[str], None] = print) -> None:
    """Run cells on Ray actors. address None: start a local cluster with `workers` CPUs (ended afterwards);
    otherwise connect to the cluster there ("auto", "host:port", "ray://host:10001") and start `workers` actors
    (default: the cluster's CPUs // cpus_per_worker). gpus_per_worker: GPUs each actor reserves (Ray hides GPUs
    from actors that reserve none; a worker loads its model on CUDA when it sees one)."""
    import ray

    started_here = False
    if not ray.is_initialized():
        if address is None:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        started_here = True
    try:
        cpus = cpus_per_worker or 1
        if address is None:
            threads = local_threads(workers)
        else:
            workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus)
            threads = cpus
        _schedule(ray, cells, done, workers, cpus, gpus_per_worker, threads, attempts, report)
    finally:
        if started_here:
            ray.shutdown()


class _Actor:
    """A Ray actor around one CellRunner (wrapped by ray.remote at first use, so Ray stays an optional import)."""

    def __init__(self, threads: int):
        self.runner = CellRunner(threads=threads)

    def run(self, cell: Cell) -> dict[str, Any]:
        return self.runner.run(cell)

    def ready(self, cell: Cell | None = None) -> bool:
        """Nothing but the round trip (bench/sweep.py times Ray's cost per cell with it)."""
        return True


def _schedule(ray, cells, done, workers, cpus, gpus, threads, attempts, report) -> None:
    remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=0)(_Actor)
    queue = deque(_groups(cells))  # groups not yet started
    tries = {cell.key: 0 for cell in cells}
    current: dict[Any, list[Cell]] = {}  # actor -> rest of its group
    in_flight: dict[Any, tuple[Any, Cell]] = {}  # ref -> (actor, cell)

    def next_cell(actor) -> Cell | None:
        group = current.get(actor)
        if not group:
            if queue:
                group = current[actor] = queue.popleft()
            else:  # nothing left to start: help the actor with the most left in its group
                busiest = max(current.values(), key=len, default=[])
                if len(busiest) < 2:
                    return None
                return busiest.pop()
        return group.pop(0)

    def start(actor) -> None:
        cell = next_cell(actor)
        if cell is not None:
            tries[cell.key] += 1
            in_flight[actor.run.remote(cell)] = (actor, cell)

    for _ in range(min(workers, len(cells))):
        start(remote.remote(threads))
    while in_flight:
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        ref = ready[0]
        actor, cell = in_flight.pop(ref)
        try:
            done(ray.get(ref))
        except ray.exceptions.RayActorError as error:  # the worker process died: replace it
            rest = current.pop(actor, [])
            if rest:
                queue.appendleft(rest)
            cause = _first_line(error)
            if tries[cell.key] < attempts:
                report(f"workbench.sweep: a worker died running {_describe(cell)} ({cause}); rescheduling it")
                queue.appendleft([cell])
            else:
                report(f"workbench.sweep: {_describe(cell)} killed its worker {tries[cell.key]} times; recorded as "
                       "failed")
                done({"key": cell.key, "config": cell.config, "status": "failed", "metrics": {}, "reply": "",
                      "error": f"WorkerDied: the worker process died {tries[cell.key]} times running this cell "
                               f"({cause})", "seconds": float("nan"), "worker": "", "finished": time.time()})
            actor = remote.remote(threads)
        start(actor)


def _describe(cell: Cell) -> str:
    config = cell.config
    parts = [config["task"]["name"], f"seed={config['seed']}"]
    for family in ("attention", "cache", "decoder", "router"):
        if family in config:
            parts.append(f"{family}={config[family]['name']}")
    return "cell " + cell.key[:8] + " (" + " ".join(parts) + ")"


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0][:160] if text else type(error).__name__
