"""Live plots fed from the generation loop's stream callback, through HoloViews streams.

`add(event)` only appends this step's records to a list (cheap enough to run after every token); `flush()`
sends what piled up to the streams, which redraws the plots. The panel decides when to flush (see `Throttle`),
so drawing never runs once per token.

    entropy       Buffer  (step, entropy)        next-token entropy curve
    cache_bytes   Buffer  (step, cache_bytes)    bytes the KV cache holds
    attention     Pipe    (layer, head) array    attention entropy of the latest step, per layer and head
    attention_row Pipe    (position, weight, token)  the latest token's attention over positions, for the chosen
                                                 layer and head (recorded with record "attention")
    cache_raster  Pipe    (step, position) codes what the chosen layer and KV head held after each step: not yet
                                                 seen, kept, evicted, merged (recorded with record "cache")
    acceptance    Buffer  (verify, tokens)       tokens each verify pass of a speculative decoder gave (the kept
                                                 drafts and the target's own; recorded with record "decoding")
    experts       Pipe    (layer, rank) array    an MoE model's experts for the latest token, best first (recorded
                                                 with record "routing"; shown for MoE models only)

`select(layer, head)` chooses the layer and query head the last two show (the raster shows the head's KV head).
Every send runs under a `PlotLock`, which panel's handling of the browser's messages shares (see plot_lock.py).
"""

from __future__ import annotations

import time

import holoviews as hv
import numpy as np
import pandas as pd
from holoviews.streams import Buffer, Pipe

from workbench.run import StepEvent
from workbench.viz.inputs import readable
from workbench.widgets.plot_lock import PlotLock

MAX_ROWS = 1_000_000  # a Buffer drops its oldest rows past its length; a run never comes near this
CACHE_STATES = ("not yet seen", "kept", "evicted", "merged")  # the raster's codes 0..3
CACHE_COLORS = ["#f4f4f4", "#3b7dd8", "#e15759", "#f2b134"]
LABELED_TOKENS = 6  # the attention row names the tokens of its highest weights on the axis


class LivePlots:
    """The streams of one panel and the DynamicMaps that draw them."""

    def __init__(self, num_layers: int, num_heads: int, num_kv_heads: int | None = None, num_experts: int = 0):
        self.lock = PlotLock()  # the sends take it; the panel makes the displayed plots' comms take it too
        self.num_layers, self.num_heads = num_layers, num_heads
        self.num_experts = num_experts  # 0: a dense model, no experts plot
        self.experts = Pipe(data=np.full((num_layers, 1), -1))
        self._latest_experts: np.ndarray | None = None
        self.groups = num_heads // (num_kv_heads or num_heads)
        self.layer, self.head = num_layers - 1, 0  # what the attention row and the cache raster show
        self.attention_row = Pipe(data=_row_frame([], [], []))
        self.cache_raster = Pipe(data=np.zeros((1, 1)))
        self.tokens: list[str] = []  # every position's token (prompt, then generated), for the row's axis
        self._events: list[tuple] = []  # (step, layer, kv_head, positions, merged_into) of the run so far
        self._given: list[int] = []  # positions handed to the cache after each step
        self._latest_row: np.ndarray | None = None
        self.entropy = Buffer(_frame("entropy", float), length=MAX_ROWS, index=False)
        self.cache_bytes = Buffer(_frame("cache_bytes", np.int64), length=MAX_ROWS, index=False)
        self.attention = Pipe(data=self._blank())
        self.acceptance = Buffer(pd.DataFrame({"verify": np.array([], dtype=np.int64),
                                               "tokens": np.array([], dtype=np.int64)}), length=MAX_ROWS, index=False)
        self._verifies: list[tuple[int, int]] = []  # (verify pass, tokens it gave) since the last flush
        self._verify_count = 0
        self._last_records: dict | None = None  # the tokens of one step share its records: count a pass once
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
        if "expert_ids" in records and (np.asarray(records["expert_ids"]) >= 0).any():
            self._latest_experts = np.asarray(records["expert_ids"])
        self.tokens.append(readable(event.token))
        if "attention" in records:  # (attn_layer, attn_head, position): the panel records one layer and head
            self._latest_row = np.asarray(records["attention"])[-1, -1]
        if "cache_positions" in records:
            self._events += records["cache_events"]
            self._given.append(records["cache_positions"])
        if "verify_accepted" in records and records is not self._last_records:
            self._verifies.append((self._verify_count, int(records["verify_accepted"]) + 1))
            self._verify_count += 1
        self._last_records = records

    def flush(self) -> None:
        """Send the records kept since the last flush to the streams (each stream redraws its plot once)."""
        with self.lock:
            for name, buffer in self._buffers.items():
                rows = self._pending[name]
                if rows:
                    buffer.send(pd.DataFrame(rows, columns=["step", name]))
                    rows.clear()
            if self._latest_attention is not None:
                self.attention.send(np.asarray(self._latest_attention, dtype=float))
                self._latest_attention = None
            if self._latest_experts is not None:
                self.experts.send(self._latest_experts)
                self._latest_experts = None
            if self._latest_row is not None:
                row = self._latest_row[:len(self.tokens)]
                seen = np.isfinite(row)
                positions = np.flatnonzero(seen)
                self.attention_row.send(_row_frame(positions, row[seen], [self.tokens[p] for p in positions]))
                self._latest_row = None
            if self._given:
                self.cache_raster.send(self.raster())
            if self._verifies:
                self.acceptance.send(pd.DataFrame(self._verifies, columns=["verify", "tokens"]))
                self._verifies = []

    def start(self, prompt_tokens: list[str]) -> None:
        """A run begins: empty every plot; the prompt's tokens label the first positions of the attention row."""
        self.reset()
        self.tokens = [readable(token) for token in prompt_tokens]

    def select(self, layer: int, head: int) -> None:
        """Show this layer and query head in the attention row and its KV head in the cache raster."""
        self.layer, self.head = layer, head
        if self._given:
            with self.lock:
                self.cache_raster.send(self.raster())

    def raster(self) -> np.ndarray:
        """Int8 (steps, positions): the state of each position in the chosen layer and KV head after each step,
        coded as CACHE_STATES."""
        given = np.asarray(self._given)
        evicted_at = np.full(given[-1], -1)
        merged = np.full(given[-1], -1)
        kv_head = self.head // self.groups
        for step, layer, head, positions, into in self._events:
            if layer == self.layer and head == kv_head:
                evicted_at[positions] = step
                if into is not None:
                    merged[positions] = into
        steps, positions = np.arange(len(given))[:, None], np.arange(given[-1])[None]
        gone = (evicted_at >= 0) & (evicted_at <= steps)
        state = np.where(gone, np.where(merged >= 0, 3, 2), 1)
        return np.where(positions < given[:, None], state, 0).astype(np.int8)

    def reset(self) -> None:
        """Empty every plot before a new run."""
        with self.lock:
            for rows in self._pending.values():
                rows.clear()
            self._latest_attention = self._latest_row = self._latest_experts = None
            self.experts.send(np.full((self.num_layers, 1), -1))
            self.tokens, self._events, self._given, self._verifies = [], [], [], []
            self._verify_count, self._last_records = 0, None
            for buffer in (*self._buffers.values(), self.acceptance):
                buffer.clear()
            self.attention.send(self._blank())
            self.attention_row.send(_row_frame([], [], []))
            self.cache_raster.send(np.zeros((1, 1)))

    def layout(self):
        """The live plots, three in a row and then the attention row and the cache raster, as a HoloViews Layout
        of DynamicMaps."""
        from bokeh.models import NumeralTickFormatter

        from workbench.viz.backend import ensure_bokeh
        from workbench.viz.style import HEATMAP_CMAP

        ensure_bokeh()  # the plot options below are bokeh's
        common = {"width": 300, "height": 240, "framewise": True, "tools": ["hover"]}  # 3 fit the panel
        entropy = hv.DynamicMap(self._entropy_curve, streams=[self.entropy]).opts(
            hv.opts.Curve(title="next-token entropy (nats)", **common))
        cache = hv.DynamicMap(self._cache_curve, streams=[self.cache_bytes]).opts(
            hv.opts.Curve(title="KV cache size", color="#c45a00", yformatter=NumeralTickFormatter(format="0.00 b"),
                          **common))
        attention = hv.DynamicMap(self._attention_image, streams=[self.attention]).opts(
            hv.opts.Image(title="attention entropy, latest step", cmap=HEATMAP_CMAP, colorbar=True, **common))
        row = hv.DynamicMap(self._row_curve, streams=[self.attention_row]).opts(
            hv.opts.Curve(xrotation=60, hover_tooltips=[("position", "@position"), ("token", "@token"),
                                                         ("weight", "@weight{0.000}")], **common))
        raster = hv.DynamicMap(self._raster_image, streams=[self.cache_raster]).opts(
            hv.opts.Image(cmap=CACHE_COLORS, clim=(-0.5, 3.5), colorbar=False, **common))
        accepted = hv.DynamicMap(self._acceptance_points, streams=[self.acceptance]).opts(
            hv.opts.Scatter(color="#2a9d8f", size=7, ylim=(0, None), **common))
        plots = entropy + cache + attention + row + raster + accepted
        if self.num_experts:
            plots += hv.DynamicMap(self._experts_image, streams=[self.experts]).opts(
                hv.opts.Image(cmap="Category20", clim=(-0.5, self.num_experts - 0.5), colorbar=True,
                              clipping_colors={"NaN": "#f4f4f4"}, **common))
        # one grid: every plot as wide, 3 fit the panel
        return plots.cols(3)

    # -- DynamicMap callbacks: data in, element out ------------------------------------------------------------
    @staticmethod
    def _entropy_curve(data):
        return hv.Curve(data, "step", "entropy")

    @staticmethod
    def _cache_curve(data):
        return hv.Curve(data, "step", "cache_bytes")

    @staticmethod
    def _acceptance_points(data):
        title = "tokens per verify pass"
        title += f" (mean {data['tokens'].mean():.2f})" if len(data) else " (none yet)"
        return hv.Scatter(data, "verify", "tokens").opts(title=title)

    def _row_curve(self, data):
        ticks, apart = [], max(1, len(self.tokens) // (3 * LABELED_TOKENS))  # labels far enough not to overlap
        for position, token in data.nlargest(4 * LABELED_TOKENS, "weight")[["position", "token"]].itertuples(
                index=False):
            if len(ticks) < LABELED_TOKENS and all(abs(position - p) >= apart for p, _ in ticks):
                ticks.append((int(position), _tick(token)))
        title = f"last token's attention, L{self.layer} H{self.head}"
        if data.empty:
            title += " (record 'attention' to see it)"
        return hv.Curve(data, "position", ["weight", "token"]).opts(title=title, xticks=ticks or None)

    def _raster_image(self, data):
        steps, positions = data.shape
        title = f"cache of L{self.layer}, KV head {self.head // self.groups}"
        # Image rows run top to bottom: flip so step 0 sits at the bottom
        return hv.Image(np.flipud(data), bounds=(-0.5, -0.5, positions - 0.5, steps - 0.5),
                        kdims=["position", "step"], vdims=["state"]).opts(
            title=title, xlabel="position (blue kept, red gone, yellow merged)", fontsize={"xlabel": "8pt"})

    def _experts_image(self, data):
        layers, ranks = data.shape
        values = np.where(data >= 0, data, np.nan).astype(float)
        # Image rows run top to bottom: flip so layer 0 sits at the bottom
        return hv.Image(np.flipud(values), bounds=(-0.5, -0.5, ranks - 0.5, layers - 0.5), kdims=["rank", "layer"],
                        vdims=["expert"]).opts(title="experts of the latest token", xlabel="rank (best first)")

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


def _row_frame(positions, weights, tokens) -> pd.DataFrame:
    return pd.DataFrame({"position": np.asarray(positions, dtype=np.int64), "weight": np.asarray(weights, dtype=float),
                         "token": list(tokens)})


def _tick(token: str) -> str:
    """An axis label for a (readable) token: visible spaces, at most 10 characters."""
    token = token.replace(" ", "␣")
    return token if len(token) <= 10 else token[:9] + "…"


def _frame(name: str, dtype) -> pd.DataFrame:
    return pd.DataFrame({"step": np.array([], dtype=np.int64), name: np.array([], dtype=dtype)})
