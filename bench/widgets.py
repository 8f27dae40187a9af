"""Benchmark: does driving the Workbench panel's live plots slow generation down?

Two configurations generate exactly N tokens greedily from the same chat prompt, recording what the panel records
by default (entropy and cache, which its live plots draw), both in a background thread as the panel runs it:
  plain   wb.generate(model, messages, record=["entropy", "cache"], max_new_tokens=N, ignore_eos=True)
  live    the same run started by the panel's Run path (Workbench.run: background thread, stream callback,
          throttled redraws), with its live plots rendered to bokeh and every redraw serialized into the
          PATCH-DOC messages a notebook pushes to the browser (a sink comm takes them and counts their bytes)

tokens/s = N / wall seconds of the generate() call: for the panel, the call inside its thread (stream callbacks
and redraws included; the final plots drawn after the run are timed separately). Each configuration runs once as a
warm-up, then they alternate for --repeats rounds and the medians are compared. Target: live >= 0.70 x plain.

Both run in a worker thread because where torch runs matters on a busy CPU: with 2 intra-op threads on 2 shared
cores, the same generate() call took ~8x longer in the main thread than in a worker thread (which behaves like
torch.set_num_threads(1)); comparing a main-thread run with the panel's worker-thread run would measure that.

    .venv/bin/python bench/widgets.py                     # embedded SmolLM2-135M-Instruct on CPU, 64 tokens
    .venv/bin/python bench/widgets.py --tokens 32 --repeats 2 --model tiny:llama
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

import torch
import transformers

import workbench as wb
from workbench.widgets import Workbench

TARGET = 0.70  # live tokens/s at least this share of plain tokens/s
RECORD = ["entropy", "cache"]


class SinkComm:
    """Stands in for the Jupyter comm that carries plot updates to the browser: accepts the serialized messages
    and counts their bytes (panel's `push` sends only through a comm whose `_comm` is set)."""

    id = "bench-sink"
    _comm = True

    def __init__(self):
        self.messages, self.bytes = 0, 0

    def send(self, data=None, metadata=None, buffers=None):
        self.messages += 1
        self.bytes += len(data or "") + sum(len(b) for b in buffers or ())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per generation (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of both configurations (default 3)")
    parser.add_argument("--prompt", default="Explain why the sky is blue.", help="the user message")
    parser.add_argument("--model", default=None, help="default: embedded SmolLM2; 'tiny:llama' etc. for tiny models")
    return parser.parse_args(argv)


def load_model(name: str | None) -> wb.Model:
    return wb.load(name, device="cpu")


def rendered_panel(model: wb.Model, prompt: str, tokens: int) -> tuple[Workbench, SinkComm]:
    """A panel whose live plots are rendered to bokeh models pushing their updates through a sink comm."""
    import holoviews as hv
    from bokeh.document import Document

    panel = Workbench(model, prompt, chat=True, max_new_tokens=tokens, record=RECORD, ignore_eos=True)
    comm, document = SinkComm(), Document()
    plot = hv.renderer("bokeh").get_plot(panel.live.layout(), doc=document, comm=comm)
    # as a notebook display does: the plot is the document's root, whose changes are held until pushed, so each
    # refresh diffs the document into a PATCH-DOC message and sends it through the comm
    document.add_root(plot.state)
    document.hold()
    plot.set_root(plot.state)
    panel._bench_plot = plot  # keep it (and its stream subscriptions) alive
    return panel, comm


def main(argv=None) -> int:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    model = load_model(args.model)
    messages = [{"role": "user", "content": args.prompt}]
    n = args.tokens
    print(f"model {model.name} on {model.device} ({str(model.dtype).removeprefix('torch.')}), torch "
          f"{torch.__version__} with {torch.get_num_threads()} threads; {n} new tokens, {args.repeats} repeats")
    panel, comm = rendered_panel(model, args.prompt, n)

    def plain() -> float:
        result = {}

        def work():
            started = time.perf_counter()
            run = wb.generate(model, messages, record=RECORD, max_new_tokens=n, ignore_eos=True)
            result["seconds"] = time.perf_counter() - started
            assert len(run.token_ids) == n

        worker = threading.Thread(target=work)
        worker.start()
        worker.join()
        return result["seconds"]

    def live() -> float:
        panel.run()
        panel.wait()
        if panel.error.value:
            raise RuntimeError(f"the panel failed: {panel.error.value}")
        assert len(panel.runs[0].token_ids) == n
        return panel.generation_seconds["A"]

    plain(), live()  # warm-up
    times: dict[str, list[float]] = {"plain": [], "live": []}
    redraws = []
    for _ in range(args.repeats):
        times["plain"].append(plain())
        sent = comm.messages
        times["live"].append(live())
        redraws.append(comm.messages - sent)
    speed = {name: n / statistics.median(seconds) for name, seconds in times.items()}
    ratio = speed["live"] / speed["plain"]
    print(f"plain (no widget)      {speed['plain']:8.2f} tokens/s")
    print(f"live widget plots      {speed['live']:8.2f} tokens/s   ({statistics.median(redraws):.0f} comm messages "
          f"per run, {comm.bytes / max(comm.messages, 1) / 1024:.1f} KiB each on average)")
    print(f"ratio live / plain     {ratio:8.3f}   target >= {TARGET:.2f}: {'PASS' if ratio >= TARGET else 'FAIL'}")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
