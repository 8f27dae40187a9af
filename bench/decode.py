"""Benchmark: decoders against greedy and against transformers' own assisted decoding, in one process.

Two prompts: an input-grounded one (repeat / lightly edit a given passage, where the output copies the input) and
an open-ended one. Each configuration generates exactly N tokens (EOS ignored) from the same prompt ids:
  hf greedy            model.hf.generate(do_sample=False)
  hf prompt lookup     model.hf.generate(do_sample=False, prompt_lookup_num_tokens=K, max_matching_ngram_size=G)
  greedy               wb.generate(decoder="greedy")
  prompt_lookup        wb.generate(decoder=prompt_lookup(k=K, max_ngram=G))
  speculative (self)   wb.generate(decoder=speculative(draft_model=the same model, k=4)): the target drafting for
                       itself accepts everything, so this shows the verify machinery's cost, not a speed-up (no
                       smaller model with SmolLM2's tokenizer is on this machine)
  layer_skip           wb.generate(decoder=layer_skip(k=4)): the model drafting for itself with every other layer of
                       its second half skipped (self-speculative, Draft & Verify / SWIFT style)
Outputs are checked equal to greedy's. Each configuration runs once as a warm-up, then the configurations are
interleaved for --repeats rounds; tokens/s is the median of N / wall seconds. Printed per configuration: tokens/s,
the ratio to wb greedy and to the matching HF configuration, forward passes, and the mean accepted length (tokens
per verify pass, the bonus token counted, as vLLM reports it).

    .venv/bin/python bench/decode.py                       # embedded SmolLM2, 96 tokens, 3 repeats
    .venv/bin/python bench/decode.py --tokens 64 --repeats 5 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import transformers

import workbench as wb

PASSAGE = ("The harbor town wakes before dawn. Fishing boats leave the pier one by one, their lanterns swinging, "
           "while the baker on Quay Street lights his ovens and the gulls gather on the roofs. By six the market "
           "square is full of crates of herring, baskets of bread and the voices of traders who have known each "
           "other for forty years. The ferry to the island sounds its horn twice before it leaves.")
PROMPTS = {
    "input-grounded": f"Rewrite this passage, changing only 'harbor' to 'port':\n\n{PASSAGE}",
    "open-ended": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=96, help="new tokens per generation (default 96)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--k", type=int, default=10, help="prompt lookup: draft tokens per pass (default 10)")
    parser.add_argument("--ngram", type=int, default=3, help="prompt lookup: longest n-gram matched (default 3)")
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    model = wb.load(args.model)
    n = args.tokens
    print(f"model {model.name} on {model.device}, torch {torch.__version__} with {torch.get_num_threads()} "
          f"threads, {n} new tokens, {args.repeats} repeats")
    results, ok = [], True
    for label, text in PROMPTS.items():
        messages = [{"role": "user", "content": text}]
        ids = model.encode(messages)
        mask = torch.ones_like(ids)

        def hf(**extra):
            def run():
                started = time.perf_counter()
                out = model.hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                        do_sample=False, eos_token_id=None, **extra)
                return time.perf_counter() - started, out[0, ids.shape[1]:].tolist(), None
            return run

        def ours(decoder):
            def run():
                started = time.perf_counter()
                result = wb.generate(model, messages, decoder=decoder, max_new_tokens=n, ignore_eos=True)
                return time.perf_counter() - started, result.token_ids, result.trace.sizes["forward"]
            return run

        configs = {
            "hf greedy": hf(),
            "hf prompt lookup": hf(prompt_lookup_num_tokens=args.k, max_matching_ngram_size=args.ngram),
            "greedy": ours("greedy"),
            "prompt_lookup": ours(wb.decode.get("prompt_lookup", k=args.k, max_ngram=args.ngram)),
            "speculative (self)": ours(wb.decode.get("speculative", draft_model=model, k=4)),
            "layer_skip": ours(wb.decode.get("layer_skip", k=4)),
        }
        peer = {"greedy": "hf greedy", "prompt_lookup": "hf prompt lookup"}
        tokens, forwards = {}, {}
        for name, fn in configs.items():  # warm-up and parity
            _, tokens[name], forwards[name] = fn()
        for name in configs:
            if tokens[name] != tokens["greedy"]:
                ok = False
                print(f"  {label}: {name} differs from greedy", file=sys.stderr)
        speeds = {name: [] for name in configs}
        for _ in range(args.repeats):
            for name, fn in configs.items():
                speeds[name].append(n / fn()[0])
        median = {name: statistics.median(v) for name, v in speeds.items()}
        print(f"\n{label} prompt ({ids.shape[1]} tokens); outputs equal greedy: "
              f"{all(tokens[c] == tokens['greedy'] for c in configs)}")
        print(f"  {'decoder':<20}{'tok/s':>8}{'vs greedy':>11}{'vs hf':>8}{'passes':>8}{'accepted len':>14}")
        for name in configs:
            passes = forwards[name]
            accepted = f"{(n - 1) / (passes - 1):.2f}" if passes and passes > 1 else "-"  # pass 1 is the prefill
            vs_hf = f"{median[name] / median[peer[name]]:.2f}x" if name in peer else "-"
            print(f"  {name:<20}{median[name]:>8.1f}{median[name] / median['greedy']:>10.2f}x{vs_hf:>8}"
                  f"{passes if passes else '-':>8}{accepted:>14}")
            results.append({"prompt": label, "decoder": name, "tokens_per_s": median[name],
                            "vs_greedy": median[name] / median["greedy"],
                            "vs_hf": median[name] / median[peer[name]] if name in peer else None,
                            "forward_passes": passes})
    if args.json:
        print(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
