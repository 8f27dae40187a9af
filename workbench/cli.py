"""The `workbench` command: `workbench run ...` generates on the embedded model (or any model) with chosen
components; `workbench list` shows every registered component. A mistake in the input prints one line and exits
with status 2; anything else is a bug in workbench: it prints the traceback and exits with status 1."""

from __future__ import annotations

import argparse
import json
import sys
import traceback

FAMILY_FLAGS = ("attention", "cache", "decoder", "router")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="raise errors instead of printing them (for a debugger)")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="generate text with chosen components and summarize what happened")
    run.add_argument("--prompt", required=True, help="the prompt (sent as a chat message when the model has a "
                                                     "chat template, unless --raw)")
    run.add_argument("--model", default=None, help="model to load: default the embedded SmolLM2-135M-Instruct; "
                                                   "a Hugging Face id, a local path, or tiny:<family>")
    run.add_argument("--raw", action="store_true", help="use the prompt as raw text, without the chat template")
    run.add_argument("--attention", default="sdpa", help="attention variant (see `workbench list`)")
    run.add_argument("--cache", default="full", help="KV cache policy")
    run.add_argument("--budget", default=None, help="the cache policy's token budget (its 'budget' parameter)")
    run.add_argument("--decoder", default="greedy", help="decoder")
    run.add_argument("--router", default="native", help="router")
    run.add_argument("--set", action="append", default=[], metavar="FAMILY.PARAM=VALUE",
                     help="set a component parameter, e.g. --set decoder.temperature=0.7 (repeatable)")
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--record", default=None,
                     help="comma-separated records to keep in the trace (entropy, attention, logits, cache, "
                          "fidelity, decoding; default entropy,cache,decoding, and with --report also the "
                          "attention rows of the first and last layers' head 0")
    run.add_argument("--trace", default=None, metavar="PATH", help="save the trace as netCDF")
    run.add_argument("--report", default=None, metavar="PATH",
                     help="write a self-contained HTML report (configuration, text, summary, plots; works offline)")
    run.add_argument("--json", action="store_true", help="print a machine-readable summary instead of text")
    run.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    run.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default by device)")

    sweeping = commands.add_parser(
        "sweep", help="run a grid of configurations from a YAML definition (resumable; --workers/--address: Ray)",
        description="workbench sweep GRID.yaml runs the grid (finished cells are kept in the store and skipped "
                    "when it runs again); workbench sweep status GRID.yaml shows done / failed / pending cells.")
    sweeping.add_argument("target", nargs="+", metavar="[status] GRID.yaml", help="the sweep definition (YAML)")
    sweeping.add_argument("--store", default=None,
                          help="results directory or fsspec URL (default: the YAML's `store:`, else GRID.results/)")
    sweeping.add_argument("--workers", type=int, default=0,
                          help="0: run in this process (default); N: a local Ray cluster of N worker processes")
    sweeping.add_argument("--address", default=None,
                          help="an existing Ray cluster (auto, host:port, ray://head:10001; default $RAY_ADDRESS "
                               "with --workers)")
    sweeping.add_argument("--cpus-per-worker", type=int, default=None, help="Ray CPUs per worker (default 1)")
    sweeping.add_argument("--gpus-per-worker", type=float, default=0,
                          help="Ray GPUs per worker (default 0; a worker with a GPU loads its model on CUDA)")
    sweeping.add_argument("--retry-failed", action="store_true", help="run again the cells stored as failed")
    sweeping.add_argument("--skip-invalid", action="store_true",
                          help="run the valid cells of a grid with invalid combinations (default: refuse)")
    sweeping.add_argument("--out", default=None, metavar="PATH", help="also save the dataset as netCDF here")
    sweeping.add_argument("--measures", default=None, help="comma-separated measures for the printed tables")
    sweeping.add_argument("--no-progress", action="store_true")

    listing = commands.add_parser("list", help="list registered components with a one-line description")
    listing.add_argument("family", nargs="?", choices=FAMILY_FLAGS, help="only this family")
    listing.add_argument("-v", "--verbose", action="store_true", help="parameters and papers too")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from workbench.errors import WorkbenchError

    try:
        commands = {"run": run_command, "sweep": sweep_command, "list": list_command}
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except WorkbenchError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception:  # not the user's mistake: show where it happened
        if args.debug:
            raise
        traceback.print_exc()
        print("workbench: internal error (the traceback above); please report it", file=sys.stderr)
        return 1


def list_command(args) -> int:
    from workbench.families import FAMILIES

    for family, module in FAMILIES.items():
        if args.family and args.family != family:
            continue
        print(f"{family}:")
        for name in module.available():
            if args.verbose:
                print("  " + module.describe(name).replace("\n", "\n  "))
            else:
                print(f"  {name:<16} {module.registry.component_class(name).summary}")
    return 0


def sweep_command(args) -> int:
    from workbench.errors import ParameterError
    from workbench.sweeps import status, sweep, table
    from workbench.sweeps.sweep import default_store

    target = list(args.target)
    asking = target[0] == "status"
    if asking:
        target = target[1:]
    if len(target) != 1:
        raise ParameterError("workbench sweep takes one definition: workbench sweep GRID.yaml, or workbench sweep "
                             "status GRID.yaml")
    definition = target[0]
    store = args.store or default_store(definition)
    if asking:
        counts = status(definition, store)
        print(f"{store}: {counts['done']} done, {counts['failed']} failed, {counts['pending']} pending of "
              f"{counts['cells']} cells ({counts['points']} grid points, {counts['invalid']} invalid)")
        return 0
    ds = sweep(definition, store, workers=args.workers, address=args.address, cpus_per_worker=args.cpus_per_worker,
               gpus_per_worker=args.gpus_per_worker,
               retry_failed=args.retry_failed, skip_invalid=args.skip_invalid, progress=not args.no_progress)
    measures = [m.strip() for m in args.measures.split(",")] if args.measures else None
    print(table(ds, measures))
    print(f"\n{ds.attrs['cells_computed']} cells computed, {ds.attrs['cells_reused']} reused from {store} in "
          f"{ds.attrs['seconds']:.0f} s")
    if args.out:
        ds.to_netcdf(args.out)
        print(f"saved {args.out}")
    return 0


def component_params(args) -> dict[str, dict[str, str]]:
    """Parameters per family from --set family.param=value and --budget."""
    from workbench.errors import ParameterError

    params: dict[str, dict[str, str]] = {family: {} for family in FAMILY_FLAGS}
    if args.budget is not None:
        params["cache"]["budget"] = args.budget
    for item in args.set:
        key, sep, value = item.partition("=")
        family, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise ParameterError(f"--set takes FAMILY.PARAM=VALUE, got {item!r}")
        if family not in params:
            raise ParameterError(f"--set {item!r}: unknown family {family!r}; families: {', '.join(FAMILY_FLAGS)}")
        params[family][name] = value
    return params


def run_command(args) -> int:
    from workbench.families import FAMILIES
    from workbench.run import generate
    from workbench.decode.telemetry import acceptance_line
    from workbench.run.result import entropy_summary_line, fidelity_summary_line

    params = component_params(args)
    components = {family: FAMILIES[family].get(getattr(args, family), **params[family])
                  for family in FAMILY_FLAGS}  # checked before the model loads: bad input fails fast
    if args.report:
        from workbench.report import check_report_path

        check_report_path(args.report)
    model = _load(args)
    record = _record(args, model)
    prompt = args.prompt
    if not args.raw and model.has_chat_template:
        prompt = [{"role": "user", "content": args.prompt}]

    def show(event):
        print(event.text, end="", flush=True)

    run = generate(model, prompt, **components, record=record, max_new_tokens=args.max_new_tokens,
                      stream=None if args.json else show)
    if args.trace:
        run.save(args.trace)
    if args.report:
        from workbench.report import write_report

        write_report(run, args.report)
    if args.json:
        summary = run.summary()
        summary["trace"] = args.trace
        summary["report"] = args.report
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print()
    print(f"\n{len(run.token_ids)} tokens ({run.finish_reason}) at {run.tokens_per_s:.1f} tokens/s "
          f"(prefill {run.prefill_seconds * 1000:.0f} ms for {len(run.prompt_ids)} prompt tokens, "
          f"decode {run.decode_tokens_per_s:.1f} tokens/s)")
    evicted = int((run.trace["cache_evicted_at"] >= 0).sum()) if "cache_evicted_at" in run.trace else 0
    print(f"cache: peak {run.peak_cache_bytes / 2**20:.2f} MiB (held after a pass: "
          f"{run.held_cache_bytes / 2**20:.2f} MiB), {evicted} entries evicted ({components['cache']})")
    print(entropy_summary_line(run))
    if "fidelity" in record:
        print(fidelity_summary_line(run))
    if "verify_drafted" in run.trace:
        print(acceptance_line(run))
    if args.trace:
        print(f"trace saved to {args.trace}")
    if args.report:
        print(f"report written to {args.report}")
    return 0


def _record(args, model):
    """What the trace keeps: --record when given; else entropy, cache and decoding telemetry, plus for --report the
    attention rows its attention-pattern plots show (first and last layer, head 0: small, unlike every row of every head)."""
    if args.record is not None:
        return [r.strip() for r in args.record.split(",") if r.strip()]
    if args.report:
        return {"entropy": True, "cache": True, "decoding": True,
                "attention": {"layers": sorted({0, model.num_layers - 1}), "heads": [0]}}
    return ["entropy", "cache", "decoding"]


def _load(args):
    from workbench.models import load

    return load(args.model, device=args.device, dtype=args.dtype)


if __name__ == "__main__":
    sys.exit(main())
