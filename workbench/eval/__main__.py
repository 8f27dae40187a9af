"""python -m workbench.eval: score cache policies x budgets on retrieval and perplexity tasks; print tables.

    .venv/bin/python -m workbench.eval --policies all --budgets 64,128,256,512,1024 --context 2000 --seeds 2 \\
        --out results.nc
    .venv/bin/python -m workbench.eval --model tiny:llama --context 200 --policies full,snapkv --budgets 64
"""

from __future__ import annotations

import argparse
import sys
import time

from workbench.errors import WorkbenchError

TASK_NAMES = ("passkey", "needle", "multikey", "multiturn", "perplexity")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m workbench.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--policies", default="all",
                        help="comma-separated registered cache policies, or 'all' (default: every registered one)")
    parser.add_argument("--budgets", default="64,128,256,512,1024", help="tokens kept per layer and KV head")
    parser.add_argument("--tasks", default="passkey,perplexity", help=f"comma-separated, of {', '.join(TASK_NAMES)}")
    parser.add_argument("--context", type=int, default=2000,
                        help="retrieval prompt tokens / perplexity context tokens (default 2000)")
    parser.add_argument("--continuation", type=int, default=128, help="perplexity: tokens scored (default 128)")
    parser.add_argument("--chunk", type=int, default=1, help="perplexity: continuation tokens per forward pass")
    parser.add_argument("--depth", default="0.5", help="needle depth, a fraction or a range 'low-high' drawn per seed")
    parser.add_argument("--filler", default=None, help="haystack: 'repeat', 'text' or a .txt path (task default)")
    parser.add_argument("--keys", type=int, default=4, help="multikey / multiturn: keys hidden")
    parser.add_argument("--seeds", type=int, default=2, help="seeds 0..n-1 (default 2)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="reply length limit per question")
    parser.add_argument("--model", default=None, help="default: embedded SmolLM2; 'tiny:llama' etc.; a hub id/path")
    parser.add_argument("--device", default=None)
    parser.add_argument("--prefill", default="replay", choices=("replay", "run"),
                        help="replay one full-cache prefill per prompt into every cache (exact, fast; default) or "
                             "run a real prefill per configuration")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (on a shared machine 1 can be much faster than oversubscribing)")
    parser.add_argument("--out", default=None, help="save the dataset as netCDF here")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--stop-on-error", action="store_true",
                        help="stop at the first failing run (default: record NaN, report, go on)")
    return parser.parse_args(argv)


def build_tasks(args):
    from workbench.eval import tasks as task_module

    depth = _depth(args.depth)
    filler = {"filler": args.filler} if args.filler else {}
    made = []
    for name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        if name == "passkey":
            made.append(task_module.Passkey(length=args.context, depth=depth, **filler))
        elif name == "needle":
            made.append(task_module.Needle(length=args.context, depth=depth, **filler))
        elif name in ("multikey", "multiturn"):
            made.append(task_module.TASKS[name](length=args.context, keys=args.keys, **filler))
        elif name == "perplexity":
            made.append(task_module.Perplexity(context=args.context, continuation=args.continuation))
        else:
            raise WorkbenchError(f"unknown task {name!r}; available: {', '.join(TASK_NAMES)}")
    return made


def _integers(text: str, flag: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise WorkbenchError(f"{flag} takes comma-separated integers, got {text!r}") from None


def _depth(text: str):
    try:
        if "-" in text.strip("-"):
            low, high = text.split("-")
            return float(low), float(high)
        return float(text)
    except ValueError:
        raise WorkbenchError(f"--depth must be a number like 0.5 or a range like 0.2-0.8, got {text!r}") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    import transformers

    import workbench as wb
    from workbench.eval import evaluate, table

    transformers.logging.set_verbosity_error()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.policies.strip() == "all":
            policies = wb.cache.available()
        else:
            policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        budgets = _integers(args.budgets, "--budgets")
        tasks = build_tasks(args)
        model = wb.load(args.model, device=args.device)
        grid = {policy: budgets for policy in policies}
        print(f"model {model.name} on {model.device}; policies {', '.join(policies)}; budgets {budgets}; "
              f"tasks {', '.join(t.label for t in tasks)}; seeds {args.seeds}", flush=True)
        started = time.perf_counter()
        ds = evaluate(model, grid, tasks, seeds=args.seeds, progress=not args.no_progress,
                      errors="raise" if args.stop_on_error else "record", max_new_tokens=args.max_new_tokens,
                      chunk=args.chunk, prefill=args.prefill)
    except WorkbenchError as error:  # the user's input; anything else propagates with its traceback (status 1)
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"\n{table(ds)}\n\n{time.perf_counter() - started:.0f} s in all")
    if args.out:
        ds.to_netcdf(args.out)
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
