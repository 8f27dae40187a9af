"""Benchmark: decode speed and cache bytes vs context length, full cache against compressed caches, one process.

For each context length L (tokens of datasets/harbor_town.txt, repeated when L is longer), every configuration
prefills the same L tokens once (untimed here, shown for reference), then decodes greedily in bursts of
--tokens tokens. After one warm-up burst each, the configurations' bursts are interleaved (full, compressed, full,
...) for --repeats rounds; tokens/s is the median over bursts of tokens / wall seconds. Each burst runs inside
workbench's attention bridge, so eviction policies act as in workbench.generate. Cache bytes are what the cache
holds (kv.nbytes(), real tensor bytes) at the end. Ratios are compressed / full at the same length.

    .venv/bin/python bench/cache.py                                  # 512..4096, snapkv budget 256 (~3 min, CPU)
    .venv/bin/python bench/cache.py --contexts 1024,2048 --compressed snapkv,streaming_llm --budget 128
    .venv/bin/python bench/cache.py --model tiny:llama --contexts 128,256 --json
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import time

import torch
import transformers

import workbench as wb
from workbench.attention import use_attention
from workbench.eval import data
from workbench.eval.tasks import encode


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="512,1024,2048,4096", help="context lengths in tokens")
    parser.add_argument("--compressed", default="snapkv", help="comma-separated cache policies to compare with full")
    parser.add_argument("--budget", type=int, default=256, help="tokens kept per layer and KV head (default 256)")
    parser.add_argument("--tokens", type=int, default=16, help="decoded tokens per timed burst (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed bursts per configuration (default 3)")
    parser.add_argument("--model", default=None, help="default: embedded SmolLM2; 'tiny:llama' etc.")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    return parser.parse_args(argv)


class Decoder:
    """One configuration's cache and decoding state; every forward pass runs inside the attention bridge."""

    def __init__(self, model, policy):
        self.model, self.policy = model, policy
        self.kv = policy.build(model)
        self.position = 0
        self.next_token = None
        self.keep = ({"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.hf.forward).parameters
                     else {})

    def _forward(self, ids: torch.Tensor) -> int:
        positions = torch.arange(self.position, self.position + ids.shape[1], device=ids.device)[None]
        self.kv.see_tokens(ids)
        logits = self.model.hf(input_ids=ids, **{self.model.cache_keyword: self.kv}, position_ids=positions, use_cache=True,
                               **self.keep).logits[0, -1]
        self.position += ids.shape[1]
        return int(torch.argmax(logits))  # waits for the device

    def prefill(self, ids: list[int]) -> float:
        started = time.perf_counter()
        with torch.inference_mode(), use_attention(self.model.hf, "sdpa", None, self.kv):
            self.next_token = self._forward(torch.tensor([ids], device=self.model.device))
        return time.perf_counter() - started

    def burst(self, n: int) -> tuple[float, list[int]]:
        """Decode n tokens greedily; (seconds, tokens)."""
        tokens = []
        started = time.perf_counter()
        with torch.inference_mode(), use_attention(self.model.hf, "sdpa", None, self.kv):
            for _ in range(n):
                tokens.append(self.next_token)
                self.next_token = self._forward(torch.tensor([[self.next_token]], device=self.model.device))
        return time.perf_counter() - started, tokens


def context_ids(model, length: int) -> list[int]:
    ids = encode(model.tokenizer, data.read_text())
    while len(ids) < length:
        ids = ids + ids
    return ids[:length]


def main(argv=None) -> int:
    args = parse_args(argv)
    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = wb.load(args.model, device=args.device)
    contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    compressed = [c.strip() for c in args.compressed.split(",") if c.strip()]
    policies = {"full": wb.cache.get("full")}
    policies.update({name: wb.cache.get(name, budget=args.budget) for name in compressed})
    limit = model.max_positions
    if limit is not None and max(contexts) + args.tokens * (args.repeats + 1) > limit:
        sys.exit(f"error: the longest context plus decoded tokens passes the model's {limit} positions")
    print(f"model {model.name} on {model.device} ({str(model.dtype).removeprefix('torch.')}), torch "
          f"{torch.__version__} with {torch.get_num_threads()} threads; compressed: "
          f"{', '.join(str(p) for name, p in policies.items() if name != 'full')}")
    print(f"contexts {contexts}; {args.tokens} tokens per burst, 1 warm-up + {args.repeats} timed bursts per "
          "configuration, interleaved", flush=True)

    rows = []
    for length in contexts:
        ids = context_ids(model, length)
        decoders = {name: Decoder(model, policy) for name, policy in policies.items()}
        prefill = {name: d.prefill(ids) for name, d in decoders.items()}
        first = {name: d.burst(args.tokens)[1] for name, d in decoders.items()}  # warm-up
        speeds = {name: [] for name in decoders}
        for _ in range(args.repeats):
            for name, d in decoders.items():
                seconds, _ = d.burst(args.tokens)
                speeds[name].append(args.tokens / seconds)
        for name, d in decoders.items():
            rows.append({"context": length, "policy": name, "tokens_per_s": statistics.median(speeds[name]),
                         "min": min(speeds[name]), "max": max(speeds[name]), "cache_bytes": d.kv.nbytes(),
                         "prefill_s": prefill[name], "same_first_tokens_as_full": first[name] == first["full"]})
        done = [r for r in rows if r["context"] == length]
        print(f"  context {length}: " + ", ".join(f"{r['policy']} {r['tokens_per_s']:.1f} tok/s" for r in done),
              flush=True)

    print(f"\n{'context':>7} {'policy':<15} {'tok/s':>7} {'min..max':>13} {'x full':>7} {'cache MiB':>10} "
          f"{'x full':>7} {'prefill s':>10} {'same 1st burst':>15}")
    for r in rows:
        full = next(f for f in rows if f["context"] == r["context"] and f["policy"] == "full")
        r["speed_ratio"] = r["tokens_per_s"] / full["tokens_per_s"]
        r["bytes_ratio"] = r["cache_bytes"] / full["cache_bytes"]
        print(f"{r['context']:>7} {r['policy']:<15} {r['tokens_per_s']:>7.1f} "
              f"{r['min']:>6.1f}..{r['max']:<6.1f} {r['speed_ratio']:>7.2f} {r['cache_bytes'] / 2**20:>10.2f} "
              f"{r['bytes_ratio']:>7.3f} {r['prefill_s']:>10.2f} {str(r['same_first_tokens_as_full']):>15}")
    if args.json:
        print(json.dumps({"model": model.name, "device": str(model.device), "threads": torch.get_num_threads(),
                          "budget": args.budget, "tokens": args.tokens, "repeats": args.repeats, "rows": rows},
                         indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
