"""`Workbench`: the ipywidgets panel. Pick components, press Run, watch text and plots update while tokens stream.

    import workbench as wb
    wb.Workbench(wb.load())         # in a notebook cell

Generation runs in a background thread so the kernel stays free to receive the Stop click; the stream callback
checks a stop flag after every token. The live plots redraw from that thread under a lock that panel's handling of
the browser's messages takes too (plot_lock.py: without it, redraws were lost now and then). Whatever goes wrong (a
bad parameter, a prompt too long) is shown in the panel's error area and the buttons come back, so the panel never
dies with a traceback nobody sees.
"""

from __future__ import annotations

import threading
import time

import ipywidgets as widgets

from workbench.errors import ParameterError, WorkbenchError
from workbench.models import Model
from workbench.routers import find_routers
from workbench.run import Run, StepEvent, generate
from workbench.trace import RECORDABLE, RecordSpec
from workbench.widgets.configuration import Configuration
from workbench.widgets.live import LivePlots, Throttle
from workbench.widgets.messages import error_html, text_html
from workbench.widgets.offline import offline_view


class _Stopped(Exception):
    """Raised from the stream callback when Stop was pressed: ends generate() early."""


class Workbench:
    """A panel over one model: prompt, component pickers, Run/Stop, live plots, and the finished run's plots.

    prompt         -- the text in the prompt box at first
    chat           -- send the prompt as a user chat message through the chat template (default: when the
                      model has a chat template), else as raw text to continue
    record         -- what the trace records at first (the live plots draw "entropy", "cache", "decoding" and, for
                      MoE models, "routing"; None: those four, routing only where the model has MoE routers)
    attention, cache, decoder, router -- the members chosen at first, for both configurations
    ignore_eos     -- keep generating past end-of-sequence tokens at first (fixed-length runs)
    interval       -- seconds between live plot redraws at most (redraws also slow down when they are expensive)

    After a run, `runs` holds the Run(s) (two in compare mode), `live` the streams the plots were fed from, and
    `generation_seconds` the wall time of each generate() call ("A", "B"), live plot updates included.
    """

    def __init__(self, model: Model, prompt: str = "Name the three primary colors.", *, chat: bool | None = None,
                 max_new_tokens: int = 48, record=None, attention: str = "sdpa",
                 cache: str = "full", decoder: str = "greedy", router: str = "native", ignore_eos: bool = False,
                 interval: float = 0.2):
        from workbench.families import FAMILIES

        if not isinstance(model, Model):
            raise WorkbenchError(f"Workbench needs a workbench Model (workbench.load(), workbench.tiny()), got "
                                 f"{type(model).__name__}")
        self.model = model
        self.runs: list[Run] = []
        self.generation_seconds: dict[str, float] = {}
        routers = find_routers(model.hf)
        num_experts = max((int(router.num_experts) for router in routers.values()), default=0)
        self.live = LivePlots(model.num_layers, model.num_heads, model.num_kv_heads, num_experts)
        if record is None:
            record = ("entropy", "cache", "decoding") + (("routing",) if routers else ())
        self.throttle = Throttle(interval)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live_shown = False

        limit = model.max_positions or 4096
        families = {family: module.registry for family, module in FAMILIES.items()}
        chosen = {"attention": attention, "cache": cache, "decoder": decoder, "router": router}
        for family, name in chosen.items():
            families[family].component_class(name)  # an unknown name fails here, listing the registered ones
        token_limit = min(limit, 1024)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or \
                not 1 <= max_new_tokens <= token_limit:
            raise ParameterError(f"max_new_tokens must be an integer from 1 to {token_limit}, got {max_new_tokens!r}")
        record = set(RecordSpec.parse(record).names)  # an unknown name fails here, listing the recordable ones
        self.config_a = Configuration("A", families, chosen, limit)
        self.config_b = Configuration("B", families, chosen, limit)
        self.config_b.widget.layout.display = "none"

        if chat is None:
            chat = model.has_chat_template
        self.prompt = widgets.Textarea(value=prompt, placeholder="prompt",
                                       layout=widgets.Layout(width="100%", height="4em"))
        self.chat = widgets.Checkbox(value=chat, description="chat message", indent=False,
                                     tooltip="send the prompt as a user message through the chat template")
        self.max_new_tokens = widgets.IntSlider(value=max_new_tokens, min=1, max=token_limit,
                                                description="max new tokens", continuous_update=False,
                                                style={"description_width": "initial"})
        self.record = {name: widgets.Checkbox(value=name in record, description=name, indent=False,
                                              tooltip=help_text, layout=widgets.Layout(width="auto"))
                       for name, help_text in RECORDABLE.items()}
        # the layer and head the live attention row and cache raster show (the raster: that head's KV head)
        self.live_layer = widgets.IntSlider(value=model.num_layers - 1, min=0, max=model.num_layers - 1,
                                            description="live layer", continuous_update=False,
                                            style={"description_width": "initial"})
        self.live_head = widgets.IntSlider(value=0, min=0, max=model.num_heads - 1, description="head",
                                           continuous_update=False, style={"description_width": "initial"})
        self.ignore_eos = widgets.Checkbox(value=ignore_eos, description="ignore EOS", indent=False,
                                           layout=widgets.Layout(width="auto"),
                                           tooltip="keep generating past end-of-sequence tokens")
        self.compare = widgets.Checkbox(value=False, description="compare two configurations", indent=False)
        self.run_button = widgets.Button(description="Run", icon="play", button_style="success")
        self.stop_button = widgets.Button(description="Stop", icon="stop", button_style="danger", disabled=True)
        self.progress = widgets.IntProgress(value=0, min=0, max=max_new_tokens, description="tokens")
        self.status = widgets.HTML()
        self.error = widgets.HTML()
        self.text_a = widgets.HTML(layout=widgets.Layout(width="50%"))
        self.text_b = widgets.HTML(layout=widgets.Layout(width="50%", display="none"))
        self.live_area = widgets.Output()
        self.result_area = widgets.Output()

        self.run_button.on_click(lambda _: self.run())
        self.stop_button.on_click(lambda _: self.stop())
        self.compare.observe(self._on_compare, names="value")
        for slider in (self.live_layer, self.live_head):
            slider.observe(lambda _: self.live.select(self.live_layer.value, self.live_head.value), names="value")
        self.widget = widgets.VBox([
            widgets.HBox([self.prompt]),
            widgets.HBox([self.chat, self.max_new_tokens, self.ignore_eos]),
            widgets.HBox([widgets.Label("record:", layout=widgets.Layout(width="auto", margin="0 1em 0 0")),
                          *self.record.values()]),
            widgets.HBox([self.config_a.widget, self.config_b.widget]),
            widgets.HBox([widgets.Label("attention row and cache raster:", layout=widgets.Layout(width="auto")),
                          self.live_layer, self.live_head]),
            widgets.HBox([self.run_button, self.stop_button, self.compare, self.progress, self.status]),
            self.error,
            widgets.HBox([self.text_a, self.text_b]),
            self.live_area,
            self.result_area,
        ])
        # CSS classes name the parts for the browser test and for users' own styling
        self.widget.add_class("workbench-panel")
        self.live_area.add_class("workbench-live")
        self.result_area.add_class("workbench-results")
        self.status.add_class("workbench-status")

    # -- public actions ----------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self) -> None:
        """Start generating (both configurations, one after the other, in compare mode) in a background thread;
        returns at once. `wait()` blocks until it is done."""
        if self.running:
            return
        self._show_error(None)
        try:
            prompt = self._prompt()
            jobs = [("A", self.config_a.components())]
            if self.compare.value:
                jobs.append(("B", self.config_b.components()))
        except Exception as error:  # a bad parameter: say so in the panel, keep the buttons usable
            self._show_error(error)
            return
        self._stop.clear()
        self.runs, self.generation_seconds = [], {}
        self.result_area.outputs = ()  # the previous run's plots would be stale
        self.text_b.value = ""
        self._set_running(True)
        self._thread = threading.Thread(target=self._work, args=(prompt, jobs), name="workbench-run", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ask the running generation to stop after its current token (the text so far is kept)."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the current run has finished (for scripts and tests; the panel itself never waits)."""
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the background thread ---------------------------------------------------------------------------------
    def _work(self, prompt, jobs) -> None:
        runs: list[Run] = []
        try:
            for label, components in jobs:
                runs.append(self._generate(label, prompt, components))
            self.runs = runs
            self._show_results(runs)
            self.status.value = "done"
        except _Stopped:
            self.runs = runs
        except Exception as error:
            self._show_error(error)
        finally:
            self._set_running(False)

    def _generate(self, label: str, prompt, components: dict) -> Run:
        text_area = self.text_a if label == "A" else self.text_b
        title = f"{label}: {', '.join(map(str, components.values()))}"
        record = {name: True for name, box in self.record.items() if box.value}
        if "attention" in record:  # the rows of the layer and head the live view shows, not every head's
            record["attention"] = {"layers": [self.live_layer.value], "heads": [self.live_head.value]}
        limit = self.max_new_tokens.value
        pieces: list[str] = []
        self.live.start(self.model.token_strings(self.model.encode(prompt)[0].tolist()))
        self.live.select(self.live_layer.value, self.live_head.value)
        self.throttle.restart()
        self.progress.max, self.progress.value = limit, 0
        self._show_text(text_area, title, "", "generating...")
        started = time.perf_counter()

        def on_step(event: StepEvent) -> None:
            self.live.add(event)
            pieces.append(event.text)
            if self.throttle.due(force=event.finished or event.step == 0):
                drawing = time.perf_counter()
                self.live.flush()
                self._show_step(text_area, title, pieces, event.step + 1, started)
                self.throttle.drew(time.perf_counter() - drawing)
            if self._stop.is_set():
                raise _Stopped

        try:
            run = generate(self.model, prompt, record=record, max_new_tokens=limit, stream=on_step,
                           ignore_eos=self.ignore_eos.value, **components)
        except _Stopped:
            self.live.flush()
            self._show_text(text_area, title, "".join(pieces), f"stopped after {len(pieces)} tokens")
            self.status.value = f"stopped ({label})"
            raise
        self.generation_seconds[label] = time.perf_counter() - started
        self.progress.value = len(run.token_ids)
        self._show_text(text_area, title, run.text, f"{len(run.token_ids)} tokens, {run.tokens_per_s:.1f} tok/s, "
                                                    f"finish: {run.finish_reason}")
        self.status.value = f"{label} finished"
        return run

    # -- showing things ----------------------------------------------------------------------------------------
    def _show_step(self, text_area, title: str, pieces: list[str], tokens: int, started: float) -> None:
        speed = tokens / max(time.perf_counter() - started, 1e-9)
        self.progress.value = tokens
        self._show_text(text_area, title, "".join(pieces), f"{tokens} tokens, {speed:.1f} tok/s")

    @staticmethod
    def _show_text(text_area, title: str, text: str, note: str) -> None:
        text_area.value = text_html(title, text, note)

    def _show_error(self, error: BaseException | None) -> None:
        self.error.value = "" if error is None else error_html(error)
        if error is not None:
            self.status.value = "failed"

    def _show_results(self, runs: list[Run]) -> None:
        from workbench.widgets.results import result_view

        view = result_view(runs)
        if _in_kernel():
            self.result_area.append_display_data(offline_view(view))

    def _set_running(self, running: bool) -> None:
        self.run_button.disabled = running
        self.stop_button.disabled = not running
        if running:
            self.status.value = "running"

    def _prompt(self):
        text = self.prompt.value
        return [{"role": "user", "content": text}] if self.chat.value else text

    def _on_compare(self, change) -> None:
        shown = "flex" if change["new"] else "none"
        self.config_b.widget.layout.display = shown
        self.text_b.layout.display = shown

    # -- display in a notebook ---------------------------------------------------------------------------------
    def _ipython_display_(self) -> None:
        import holoviews as hv
        from IPython.display import display

        from workbench import viz

        if not hv.extension._loaded:  # the plots need HoloViews' JavaScript in the page (inlined: offline)
            viz.setup()
        if not self._live_shown:
            view = offline_view(self.live.layout())
            self.live_area.append_display_data(view)
            self.live.lock.guard(view)  # a browser message for the plots waits until a redraw has been pushed
            self._live_shown = True
        display(self.widget)

    def __repr__(self) -> str:
        return f"Workbench({self.model.name!r}, running={self.running})"


def _in_kernel() -> bool:
    from IPython import get_ipython

    return get_ipython() is not None
