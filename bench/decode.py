"""Benchmark: every decoder against greedy and against transformers' own decoding, in one process.

Two prompts: an input-grounded one (repeat / lightly edit a given passage, where the output copies the input) and
an open-ended one. Each configuration generates exactly N tokens (EOS ignored) from the same prompt ids. The HF
peers run `model.hf.generate` in the same process:
  greedy           hf greedy (do_sample=False)
  prompt_lookup    hf prompt lookup (prompt_lookup_num_tokens=K, max_matching_ngram_size=G)
  speculative      hf assisted (assistant_model= the same model): no smaller model with SmolLM2's tokenizer is on
                   this machine, so the target drafts for itself and keeps everything: the verify machinery's cost
  layer_skip       exits after layer E as its draft (exit_layer=E); peer hf early exit (assistant_early_exit=E)
  cache_draft      the model over a 64-token StreamingLLM cache drafts for itself (TriForce's idea); no HF peer;
                   its tiny level is not run: no smaller model with SmolLM2's tokenizer is on this machine
  beam             hf beam (num_beams=4)
  sampling family  typical, epsilon, eta against hf typical_p / epsilon_cutoff / eta_cutoff (speed only: the
                   random streams differ, so outputs are not compared)
  medusa           the shipped heads, tree verification (and "medusa chain": the chain of top-1s); no HF peer
  the rest         contrastive, dola, adadec, entropix (no HF peer in core transformers: remote code today)
Lossless decoders' outputs are checked equal to greedy's (beam: to HF's beam). Each configuration runs once as a
warm-up (recording "decoding" for the acceptance figures), then the configurations are interleaved for --repeats
timed rounds without recording; tokens/s is the median of N / wall seconds. Printed per configuration: tokens/s,
the ratio to wb greedy and to its HF peer, forward passes, the mean accepted length (tokens per verify pass, the
bonus token counted, as vLLM reports it) and the acceptance rate.

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
from workbench.decode.telemetry import acceptance

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
    parser.add_argument("--only", default=None, help="comma-separated configurations to run (with greedy and "
                                                      "their peers), e.g. 'prompt_lookup,medusa'")
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
        configs = configurations(model, messages, ids, n, args)
        if args.only:
            configs = selected(configs, args.only.split(","))
        tokens, forwards, accepted = {}, {}, {}
        for name, config in configs.items():  # warm-up, parity and acceptance
            _, tokens[name], forwards[name], accepted[name] = config.run(record=True)
        for name, config in configs.items():
            reference = tokens.get(config.equals)
            if reference is not None and tokens[name] != reference:
                ok = False
                print(f"  {label}: {name} differs from {config.equals}", file=sys.stderr)
        speeds = {name: [] for name in configs}
        for _ in range(args.repeats):
            for name, config in configs.items():
                speeds[name].append(n / config.run(record=False)[0])
        median = {name: statistics.median(v) for name, v in speeds.items()}
        checked = [name for name, c in configs.items() if c.equals]
        print(f"\n{label} prompt ({ids.shape[1]} tokens); outputs equal where they must "
              f"({', '.join(checked)}): {all(tokens[c] == tokens[configs[c].equals] for c in checked)}")
        print(f"  {'decoder':<22}{'tok/s':>8}{'vs greedy':>11}{'vs hf':>8}{'passes':>8}{'accepted len':>14}"
              f"{'rate':>7}")
        for name, config in configs.items():
            summary = accepted[name]
            vs_hf = median[name] / median[config.peer] if config.peer else None
            length = f"{summary['mean_accepted_length']:.2f}" if summary else "-"
            rate = f"{summary['acceptance_rate']:.2f}" if summary else "-"
            print(f"  {name:<22}{median[name]:>8.1f}{median[name] / median['greedy']:>10.2f}x"
                  f"{f'{vs_hf:.2f}x' if vs_hf else '-':>8}{forwards[name] or '-':>8}{length:>14}{rate:>7}")
            results.append({"prompt": label, "decoder": name, "tokens_per_s": median[name],
                            "vs_greedy": median[name] / median["greedy"], "vs_hf": vs_hf,
                            "forward_passes": forwards[name],
                            "mean_accepted_length": summary["mean_accepted_length"] if summary else None,
                            "acceptance_rate": summary["acceptance_rate"] if summary else None})
    if args.json:
        print(json.dumps(results, indent=2))
    return 0 if ok else 1


class Config:
    """One benchmarked configuration: how to run it, its HF peer (for the ratio) and what its tokens must equal."""

    def __init__(self, run, peer: str | None = None, equals: str | None = None):
        self.run, self.peer, self.equals = run, peer, equals


def configurations(model, messages, ids, n: int, args) -> dict[str, Config]:
    mask = torch.ones_like(ids)

    def hf(**extra):
        def run(record):
            started = time.perf_counter()
            out = model.hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                    eos_token_id=None, **{"do_sample": False, **extra})
            return time.perf_counter() - started, out[0, ids.shape[1]:].tolist(), None, None
        return run

    def ours(decoder):
        def run(record):
            started = time.perf_counter()
            result = wb.generate(model, messages, decoder=decoder, max_new_tokens=n, ignore_eos=True,
                                 record=["decoding"] if record else None)
            return (time.perf_counter() - started, result.token_ids, result.trace.sizes["forward"],
                    acceptance(result.trace) if record else None)
        return run

    get, exit_layer = wb.decode.get, model.num_layers // 2
    configs = {
        "hf greedy": Config(hf()),
        "greedy": Config(ours("greedy"), "hf greedy", "hf greedy"),
        "hf prompt lookup": Config(hf(prompt_lookup_num_tokens=args.k, max_matching_ngram_size=args.ngram),
                                   equals="greedy"),
        "prompt_lookup": Config(ours(get("prompt_lookup", k=args.k, max_ngram=args.ngram)), "hf prompt lookup",
                                "greedy"),
        "prompt_lookup goodput": Config(ours(get("prompt_lookup", k=args.k, max_ngram=args.ngram,
                                                 schedule="goodput")), "hf prompt lookup", "greedy"),
        "hf assisted (self)": Config(hf(assistant_model=model.hf), equals="greedy"),
        "speculative (self)": Config(ours(get("speculative", draft_model=model, k=4)), "hf assisted (self)",
                                     "greedy"),
        "layer_skip": Config(ours(get("layer_skip", k=4)), None, "greedy"),
        "hf early exit": Config(hf(assistant_early_exit=exit_layer), equals="greedy"),
        f"layer_skip exit {exit_layer}": Config(ours(get("layer_skip", exit_layer=exit_layer, k=4)),
                                                "hf early exit", "greedy"),
        "cache_draft": Config(ours(get("cache_draft", draft_budget=64, k=4)), None, "greedy"),
        "hf beam 4": Config(hf(num_beams=4)),
        "beam 4": Config(ours("beam"), "hf beam 4", "hf beam 4"),
        "hf typical": Config(hf(do_sample=True, typical_p=0.9)),
        "typical": Config(ours(get("typical", typical_p=0.9)), "hf typical"),
        "hf epsilon": Config(hf(do_sample=True, epsilon_cutoff=3e-4)),
        "epsilon": Config(ours(get("epsilon", epsilon=3e-4)), "hf epsilon"),
        "hf eta": Config(hf(do_sample=True, eta_cutoff=3e-4)),
        "eta": Config(ours(get("eta", epsilon=3e-4)), "hf eta"),
    }
    for name in ("contrastive", "dola", "adadec", "entropix", "medusa"):
        configs[name] = Config(ours(name), None, "greedy" if name == "medusa" else None)
    configs["medusa chain"] = Config(ours(get("medusa", tree="chain")), None, "greedy")
    return {name: config for name, config in configs.items() if available(name)}


def selected(configs: dict[str, Config], names: list[str]) -> dict[str, Config]:
    """The named configurations, greedy (every ratio's base) and the peers and references they need."""
    unknown = sorted(set(names) - set(configs))
    if unknown:
        raise SystemExit(f"--only: no configuration {', '.join(unknown)}; there are {', '.join(configs)}")
    keep = {"greedy", "hf greedy", *names}
    keep |= {c for name in names for c in (configs[name].peer, configs[name].equals) if c}
    return {name: config for name, config in configs.items() if name in keep}


def available(name: str) -> bool:
    """A configuration runs when its decoder is registered (and an HF peer when its decoder is)."""
    return name.split()[0] in ("hf", *wb.decode.available())


if __name__ == "__main__":
    sys.exit(main())
