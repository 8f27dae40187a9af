"""Ablation sweeps: declare a grid once, run it here or on Ray, resume after a crash, get one labelled Dataset.

    import workbench as wb
    ds = wb.sweep({"model": "tiny:llama",
                   "axes": {"cache": ["full", "snapkv", "h2o"], "budget": [32, 64],
                            "task": [{"passkey": {"length": 200}}, {"perplexity": {"context": 200}}],
                            "seed": [0, 1]}},
                  store="results/my_sweep")          # finished cells are kept; re-running skips them
    print(wb.sweep.table(ds))
    wb.sweep.heatmap(ds, "accuracy", x="budget", y="cache")

From a shell:  workbench sweep grid.yaml [--workers 2 | --address auto] [--retry-failed]
               workbench sweep status grid.yaml

See workbench.sweeps.grid for the definition, workbench.sweeps.store for the results store and
workbench.sweeps.execute for how cells are scheduled on Ray.
"""

from workbench.sweeps.grid import Grid, SweepError
from workbench.sweeps.store import Store
from workbench.sweeps.sweep import load_definition, status, sweep
from workbench.sweeps.table import table


# `wb.sweep(...)` runs a sweep; `wb.sweep.table(ds)`, `wb.sweep.status(...)`, `wb.sweep.heatmap(...)` are its tools.
sweep.table = table
sweep.status = status
sweep.Grid = Grid


def _picture(name):
    def draw(*args, **kwargs):
        from workbench.sweeps import plots

        return getattr(plots, name)(*args, **kwargs)

    draw.__name__ = name
    draw.__doc__ = f"workbench.sweeps.plots.{name} (imports HoloViews on first use)"
    return draw


for _name in ("heatmap", "frontier", "spread"):
    setattr(sweep, _name, _picture(_name))

__all__ = ["sweep", "status", "table", "Grid", "Store", "SweepError", "load_definition"]
