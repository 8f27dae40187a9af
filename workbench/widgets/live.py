"""Live plots fed from the generation loop's stream callback, through HoloViews streams.

`add(event)` only appends this step's records to a list (cheap enough to run after every token); `flush()`
sends what piled up to the streams, which redraws the plots. The panel decides when to flush (see `Throttle`),
so drawing never runs once per token.

    entropy       Buffer  (step, entropy)        next-token entropy curve
    cache_bytes   Buffer  (step, cache_bytes)    bytes the KV cache holds
    attention     Pipe    (layer, head) array    attention entropy of the latest step, per layer and head
"""

from __future__ import annotations

import time

import holoviews as hv
import numpy as np
import pandas as pd
from holoviews.streams import Buffer, Pipe

from workbench.run import StepEvent

MAX_ROWS = 1_000_000  # a Buffer drops its oldest rows past its length; a run never comes near this


class LivePlots:
    """The streams of one panel and the DynamicMaps that draw them."""

    def __init__(self, num_layers: int, num_heads: int):
        self.num_layers, self.num_heads = num_layers, num_heads
        self.entropy = Buffer(_frame("entropy", float), length=MAX_ROWS, index=False)
        self.cache_bytes = Buffer(_frame("cache_bytes", np.int64), length=MAX_ROWS, index=False)
        self.attention = Pipe(data=self._blank())
        self._buffers = {"entropy": self.entropy, "cache_bytes": self.cache_bytes}
        self._pending: dict[str, list] = {name: [] for name in self._buffers}
        self._latest_attention: np.ndarray | None = None

    def add(self, event: StepEvent) -> None:
        """Keep this step's records until the next flush."""
        records = event.records
        for name in self._pending:
            if name in records:
                self._pending[name].append((event.step, records[name]))
        if "attention_entropy" in records:
            self._latest_attention = records["attention_entropy"]

    def flush(self) -> None:
        """Send the records kept since the last flush to the streams (each stream redraws its plot once)."""
        for name, buffer in self._buffers.items():
            rows = self._pending[name]
            if rows:
                buffer.send(pd.DataFrame(rows, columns=["step", name]))
                rows.clear()
        if self._latest_attention is not None:
            self.attention.send(np.asarray(self._latest_attention, dtype=float))
            self._latest_attention = None

    def reset(self) -> None:
        """Empty every plot before a new run."""
        for rows in self._pending.values():
            rows.clear()
        self._latest_attention = None
        for buffer in self._buffers.values():
            buffer.clear()
        self.attention.send(self._blank())

    def layout(self):
        """The three live plots side by side, as a HoloViews Layout of DynamicMaps."""
        from bokeh.models import NumeralTickFormatter

        from workbench.viz.backend import ensure_bokeh
        from workbench.viz.style import HEATMAP_CMAP

        ensure_bokeh()  # the plot options below are bokeh's
        common = {"width": 320, "height": 240, "framewise": True, "tools": ["hover"]}
        entropy = hv.DynamicMap(self._entropy_curve, streams=[self.entropy]).opts(
            hv.opts.Curve(title="next-token entropy (nats)", **common))
        cache = hv.DynamicMap(self._cache_curve, streams=[self.cache_bytes]).opts(
            hv.opts.Curve(title="KV cache size", color="#c45a00", yformatter=NumeralTickFormatter(format="0.00 b"),
                          **common))
        attention = hv.DynamicMap(self._attention_image, streams=[self.attention]).opts(
            hv.opts.Image(title="attention entropy, latest step", cmap=HEATMAP_CMAP, colorbar=True, **common))
        return (entropy + cache + attention).cols(3)

    # -- DynamicMap callbacks: data in, element out ------------------------------------------------------------
    @staticmethod
    def _entropy_curve(data):
        return hv.Curve(data, "step", "entropy")

    @staticmethod
    def _cache_curve(data):
        return hv.Curve(data, "step", "cache_bytes")

    def _attention_image(self, data):
        # Image rows run top to bottom: flip so layer 0 sits at the bottom
        bounds = (-0.5, -0.5, self.num_heads - 0.5, self.num_layers - 0.5)
        return hv.Image(np.flipud(data), bounds=bounds, kdims=["head", "layer"], vdims=["attention_entropy"])

    def _blank(self) -> np.ndarray:
        # zeros, not NaN: an all-NaN image makes HoloViews warn on every redraw
        return np.zeros((self.num_layers, self.num_heads))


class Throttle:
    """Decides when live plots redraw: at most every `interval` seconds, and adaptively less often when drawing
    is slow, so that drawing takes at most about `share` of the run's time."""

    def __init__(self, interval: float = 0.2, share: float = 0.1):
        self.interval, self.share = interval, share
        self._wait = interval
        self._last = -float("inf")

    def due(self, force: bool = False) -> bool:
        return force or time.perf_counter() - self._last >= self._wait

    def drew(self, seconds: float) -> None:
        """Record that a redraw took `seconds`; the next one waits long enough to keep drawing's share small."""
        self._last = time.perf_counter()
        self._wait = max(self.interval, seconds / self.share)

    def restart(self) -> None:
        self._wait = self.interval
        self._last = -float("inf")


def _frame(name: str, dtype) -> pd.DataFrame:
    return pd.DataFrame({"step": np.array([], dtype=np.int64), name: np.array([], dtype=dtype)})
