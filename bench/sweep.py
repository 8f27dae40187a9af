"""Benchmark: sweep throughput in this process against a local Ray cluster, and Ray's per-cell overhead, in one run.

One grid (cache policies x budgets x a perplexity and a passkey task x seeds on the embedded model, short
contexts so the whole benchmark takes a few minutes) runs two ways, each into a fresh store:
  serial      -- in this process, torch using every core
  workers N   -- a local Ray cluster of N worker processes (cores split between them), startup included
and the two datasets are checked equal (every measure but wall times). Then Ray's own cost per cell: the time to
send one cell to a warm actor and get a record back when the cell does nothing (a no-op method with the same
arguments), against the mean seconds a cell spends on its own work.

    .venv/bin/python bench/sweep.py                      # embedded model, --workers 2
    .venv/bin/python bench/sweep.py --model tiny:llama --workers 2 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import numpy as np

import workbench as wb
from workbench.sweeps.dataset import TIMING
from workbench.sweeps.execute import local_threads


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded", help="default: the embedded SmolLM2; 'tiny:llama' etc.")
    parser.add_argument("--context", type=int, default=400, help="prompt / context tokens (default 400)")
    parser.add_argument("--caches", default="full,streaming_llm,snapkv,h2o,tova", help="comma-separated policies")
    parser.add_argument("--budgets", default="64,128", help="comma-separated budgets")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--calls", type=int, default=200, help="no-op round trips timed for the overhead")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def grid(args) -> dict:
    return {"model": args.model,
            "axes": {"cache": args.caches.split(","), "budget": [int(b) for b in args.budgets.split(",")],
                     "task": [{"passkey": {"length": args.context}},
                              {"perplexity": {"context": args.context, "continuation": 32}}],
                     "seed": list(range(args.seeds))}}


def same_measures(a, b) -> bool:
    for name in a.data_vars:
        if name in TIMING:
            continue
        x, y = a[name].values, b[name].values
        if not (np.array_equal(x, y, equal_nan=True) if x.dtype.kind == "f" else (x == y).all()):
            print(f"  {name} differs", file=sys.stderr)
            return False
    return True


def overhead(args, cells) -> dict:
    """Seconds per round trip of a cell to a warm Ray actor whose method returns at once."""
    import ray

    from workbench.sweeps.execute import _Actor

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        actor = ray.remote(num_cpus=1)(_Actor).remote(1)
        cell = cells[0]
        for _ in range(10):  # warm the path
            ray.get(actor.ready.remote(cell))
        times = []
        for _ in range(args.calls):
            started = time.perf_counter()
            ray.get(actor.ready.remote(cell))  # the cell goes there as in a sweep; nothing is computed
            times.append(time.perf_counter() - started)
    finally:
        ray.shutdown()
    return {"round_trip_s": statistics.median(times), "round_trip_p90_s": float(np.quantile(times, 0.9))}


def main(argv=None) -> int:
    args = parse_args(argv)
    definition = grid(args)
    plan = wb.sweep.Grid.parse(definition).plan()
    print(f"grid: {len(plan.points)} points, {len(plan.cells)} cells on {args.model} "
          f"(context {args.context} tokens)", flush=True)
    results = {}
    datasets = {}
    for mode, workers in (("serial", 0), (f"workers {args.workers}", args.workers)):
        with tempfile.TemporaryDirectory() as store:
            started = time.perf_counter()
            ds = wb.sweep(definition, store, workers=workers, progress=False)
            wall = time.perf_counter() - started
        cell_seconds = [float(v) for v in ds.seconds.values.ravel() if np.isfinite(v)]
        datasets[mode] = ds
        results[mode] = {"wall_s": wall, "cells": int(ds.attrs["cells_computed"]),
                         "cells_per_min": 60 * ds.attrs["cells_computed"] / wall,
                         "mean_cell_s": statistics.mean(cell_seconds)}
        print(f"{mode:>10}: {wall:6.1f} s, {results[mode]['cells_per_min']:6.1f} cells/min, "
              f"a cell's own work {results[mode]['mean_cell_s']:.2f} s on average", flush=True)
    equal = same_measures(datasets["serial"], datasets[f"workers {args.workers}"])
    trip = overhead(args, list(plan.cells.values()))
    serial, ray_run = results["serial"], results[f"workers {args.workers}"]
    ratio = ray_run["cells_per_min"] / serial["cells_per_min"]
    share = trip["round_trip_s"] / ray_run["mean_cell_s"]
    print(f"\nworkers {args.workers} / serial: {ratio:.2f}x cells per minute (threads per worker "
          f"{local_threads(args.workers)}; cluster start and model loading included)")
    print(f"Ray round trip per cell: {trip['round_trip_s'] * 1e3:.2f} ms median "
          f"({trip['round_trip_p90_s'] * 1e3:.2f} ms p90) = {100 * share:.3f}% of a cell's own work "
          f"({ray_run['mean_cell_s']:.2f} s)")
    print(f"serial and Ray measures equal: {equal}")
    if args.json:
        print(json.dumps({"results": results, "ratio": ratio, "overhead": trip, "overhead_share": share,
                          "equal": equal}, indent=2))
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
