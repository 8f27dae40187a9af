"""Benchmark: the `layer_skip` router (skip the layers the prompt finds redundant) against the full model, same run.

For each share of skipped layers and each metric: decode tokens per second (greedy, --tokens new tokens after a
passage of datasets/harbor_town.txt, best of --repeats) as a ratio to the full model measured in the same run,
and perplexity of a continuation of that text (the first --context tokens are the prefill that decides the
layers). The early exit the logit lens would allow is printed too: the first layer whose lens agrees with the
model's top token on 50% / 90% of the steps.

    .venv/bin/python bench/layer_skip.py                 # about a minute on a 2-core CPU
    .venv/bin/python bench/layer_skip.py --shares 0.1,0.25 --tokens 64
"""

from __future__ import annotations

import argparse
import sys

import torch

import workbench as wb
from workbench.eval.data import read_text
from workbench.routers.early_exit import first_confident_layer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=48, help="new tokens decoded per run (default 48)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration; the fastest counts")
    parser.add_argument("--shares", default="0.1,0.2,0.3", help="shares of the layers skipped (comma-separated)")
    parser.add_argument("--context", type=int, default=64, help="prefill tokens before the scored continuation")
    parser.add_argument("--scored", type=int, default=256, help="continuation tokens scored for perplexity")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    model = wb.load()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {model.name} ({model.num_layers} layers)")
    text = read_text()
    prompt = [{"role": "user", "content": "Continue this story:\n\n" + " ".join(text.split()[:80])}]
    ids = model.encode(text)[0].tolist()
    context, continuation = ids[:args.context], ids[args.context:args.context + args.scored]

    def measure(router) -> tuple[float, float, list[int]]:
        runs = [wb.generate(model, prompt, router=router, max_new_tokens=args.tokens, ignore_eos=True)
                for _ in range(args.repeats)]
        ppl = wb.eval.perplexity(model, context, continuation, chunk=len(continuation), router=router).perplexity
        return max(r.decode_tokens_per_s for r in runs), ppl, list(runs[0].token_ids)

    configs = [("full model", "native")] + [
        (f"layer_skip {float(share):.0%} {metric}", wb.routers.get("layer_skip", share=float(share), metric=metric))
        for share in args.shares.split(",") for metric in ("bi", "angular")]
    full_speed = None
    print(f"\n{'configuration':<26}{'layers run':>11}{'decode tok/s':>14}{'vs full':>9}{'perplexity':>12}")
    for label, router in configs:
        speed, ppl, _ = measure(router)
        full_speed = full_speed or speed
        run = model.num_layers - (router.count(model.num_layers) if router != "native" else 0)
        print(f"{label:<26}{run:>11}{speed:>14.1f}{speed / full_speed:>8.2f}x{ppl:>12.1f}")

    lens = wb.generate(model, prompt, max_new_tokens=args.tokens, ignore_eos=True, record="layers")
    print(f"\nlogit lens over {args.tokens} steps: the first layer agreeing with the model's top token on 50% of "
          f"them is {first_confident_layer(lens.trace, 0.5)}, on 90%: {first_confident_layer(lens.trace, 0.9)} "
          f"(of 0..{model.num_layers - 1})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
