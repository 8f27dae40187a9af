"""A heatmap that fills in while a sweep runs in a notebook (outside a notebook it does nothing)."""

from __future__ import annotations

import time

class LiveHeatmap:
    """Redraws `measure` over the sweep's first two axes at most once per `every` seconds, and once at the end."""

    def __init__(self, measure: str, every: float = 1.0):
        self.measure, self.every = measure, every
        self.handle = None
        self.last = 0.0
        try:
            from IPython import get_ipython

            self.active = get_ipython() is not None and hasattr(get_ipython(), "kernel")
        except ImportError:
            self.active = False

    def __call__(self, make, final: bool = False) -> None:
        if not self.active or (not final and time.monotonic() - self.last < self.every):
            return
        from IPython.display import display

        from workbench.sweeps.plots import heatmap

        ds = make()
        if self.measure not in ds:  # nothing measured yet
            return
        plot = heatmap(ds, self.measure, title=f"{self.measure} ({int((ds.status == 'done').sum())} of "
                                               f"{ds.status.size} grid points done)")
        if self.handle is None:
            self.handle = display(plot, display_id=True)
        else:
            self.handle.update(plot)
        self.last = time.monotonic()
