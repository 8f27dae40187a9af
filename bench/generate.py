"""Benchmark: workbench's generation loop against plain Hugging Face `generate`, in one process.

Three configurations generate exactly N tokens greedily from the same prompt token ids:
  hf          model.hf.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False, eos_token_id=None)
              (EOS is just another token, as with ignore_eos: it cannot stop early, and greedy parity holds)
  wb          wb.generate(model, messages, max_new_tokens=N, ignore_eos=True)          (recording off)
  wb+entropy  wb.generate(model, messages, max_new_tokens=N, ignore_eos=True, record=["entropy"])

Every call is timed end to end with time.perf_counter (for workbench that includes encoding the chat prompt and
building the trace); tokens/s = N / wall seconds. The workbench rows also show run.tokens_per_s, which times only
the forward passes and token choice (prefill + decode steps). Each configuration runs once as a warm-up, then the
configurations are interleaved (hf, wb, wb+entropy, hf, ...) for --repeats rounds and the median is reported.
The verdict uses the end-to-end medians: targets are wb >= 1.00 x hf and wb+entropy >= 0.95 x hf.

    .venv/bin/python bench/generate.py                      # embedded SmolLM2-135M-Instruct, 64 tokens, 5 repeats
    .venv/bin/python bench/generate.py --tokens 128 --repeats 3 --json
    .venv/bin/python bench/generate.py --model tiny:llama
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

TARGETS = {"wb": 1.00, "wb+entropy": 0.95}  # minimum tokens/s ratio vs plain HF


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per generation (default 64)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds over all configurations (default 5)")
    parser.add_argument("--prompt", default="Explain why the sky is blue.", help="the user message")
    parser.add_argument("--model", default=None, help="default: embedded SmolLM2; 'tiny:llama' etc. for tiny models")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA if available)")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    return parser.parse_args(argv)


def load_model(name: str | None, device: str | None) -> wb.Model:
    if name and name.startswith("tiny:"):
        return wb.tiny(name.split(":", 1)[1], device=device or "cpu")
    return wb.load(name, device=device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    model = load_model(args.model, args.device)
    messages = [{"role": "user", "content": args.prompt}]
    ids = model.encode(messages)
    mask = torch.ones_like(ids)
    n = args.tokens
    print(f"model {model.name} on {model.device} ({str(model.dtype).removeprefix('torch.')}), "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, transformers {transformers.__version__}")
    print(f"prompt {ids.shape[1]} tokens, {n} new tokens, {args.repeats} repeats (after one warm-up each)")

    def hf():
        sync(model.device)
        started = time.perf_counter()
        out = model.hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                eos_token_id=None)
        sync(model.device)
        return time.perf_counter() - started, out[0, ids.shape[1]:].tolist(), None

    def workbench(record):
        def run():
            sync(model.device)
            started = time.perf_counter()
            result = wb.generate(model, messages, max_new_tokens=n, ignore_eos=True, record=record)
            sync(model.device)
            return time.perf_counter() - started, result.token_ids, result.tokens_per_s
        return run

    configs = {"hf": hf, "wb": workbench(None), "wb+entropy": workbench(["entropy"])}
    tokens = {}
    for name, fn in configs.items():  # warm-up; also the parity run
        tokens[name] = fn()[1]
        if len(tokens[name]) != n:
            sys.exit(f"error: {name} generated {len(tokens[name])} tokens, expected {n}")
    if tokens["hf"] != tokens["wb"]:
        first = next(i for i, (a, b) in enumerate(zip(tokens["hf"], tokens["wb"])) if a != b)
        sys.exit(f"error: greedy parity broken: hf and wb differ from token {first} "
                 f"({tokens['hf'][first]} vs {tokens['wb'][first]})")
    print(f"greedy parity hf == wb: ok ({n} tokens identical); wb+entropy == wb: "
          f"{'ok' if tokens['wb+entropy'] == tokens['wb'] else 'DIFFERS'}")

    walls = {name: [] for name in configs}
    inner = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, fn in configs.items():
            seconds, _, loop_tps = fn()
            walls[name].append(n / seconds)
            if loop_tps is not None:
                inner[name].append(loop_tps)

    base = statistics.median(walls["hf"])
    results = []
    for name in configs:
        tps = statistics.median(walls[name])
        results.append({"config": name, "tokens_per_s": round(tps, 2), "ratio_vs_hf": round(tps / base, 3),
                        "loop_tokens_per_s": round(statistics.median(inner[name]), 2) if inner[name] else None,
                        "min": round(min(walls[name]), 2), "max": round(max(walls[name]), 2),
                        "target": TARGETS.get(name)})

    print(f"\n{'config':<12} {'tok/s (median)':>15} {'ratio vs hf':>12} {'min..max':>15} {'wb loop tok/s':>14}")
    for r in results:
        loop = f"{r['loop_tokens_per_s']:.2f}" if r["loop_tokens_per_s"] is not None else "-"
        print(f"{r['config']:<12} {r['tokens_per_s']:>15.2f} {r['ratio_vs_hf']:>12.3f} "
              f"{r['min']:>7.2f}..{r['max']:<7.2f} {loop:>14}")

    checks = [(r["config"], r["ratio_vs_hf"], r["target"]) for r in results if r["target"] is not None]
    passed = all(ratio >= target for _, ratio, target in checks)
    print("\nverdict: " + ("PASS" if passed else "FAIL") + " -- " + "; ".join(
        f"{name} {ratio:.2f}x hf {'>=' if ratio >= target else '<'} {target:.2f}" for name, ratio, target in checks))
    if args.json:
        print(json.dumps({"model": model.name, "device": str(model.device), "threads": torch.get_num_threads(),
                          "prompt_tokens": ids.shape[1], "new_tokens": n, "repeats": args.repeats,
                          "results": results, "pass": passed}, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
