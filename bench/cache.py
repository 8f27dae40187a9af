"""Benchmark: decode speed, host synchronisations and cache bytes vs context length, full cache against compressed
caches, in one process.

For each context length L (tokens of datasets/harbor_town.txt, repeated when L is longer), every configuration
prefills the same L tokens once through a workbench Session (untimed here, shown for reference), then decodes
greedily in bursts of --tokens tokens (one decode pass each). After one warm-up burst each, the configurations'
bursts are interleaved (full, compressed, full, ...) for --repeats rounds; tokens/s is the median over bursts of
tokens / wall seconds. Ratios are compressed / full at the same length.

Host synchronisations: one more burst per configuration runs under a torch function mode that counts the calls
that make the host wait for (or read back from) the device: .item(), .tolist(), int()/float()/bool() of a tensor,
nonzero, unique, masked_select, boolean-mask indexing and .cpu()/.numpy(). On a CPU nothing waits, but each is a
host round trip a GPU would stall on; the count per token is what to keep small (one is the token itself).

    .venv/bin/python bench/cache.py                                  # 512..4096, every eviction policy, budget 256
    .venv/bin/python bench/cache.py --contexts 1024,2048 --compressed snapkv,streaming_llm --budget 128
    .venv/bin/python bench/cache.py --model tiny:llama --contexts 128,256 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import transformers
from torch.overrides import TorchFunctionMode

import workbench as wb
from workbench.eval import data
from workbench.eval.tasks import encode

EVICTING = ["streaming_llm", "h2o", "snapkv", "tova", "knorm", "pyramidkv", "cake", "lazy_eviction",
            "razor_attention", "kvmerger", "d2o", "mpcache", "sentence_kv"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="512,1024,2048,4096", help="context lengths in tokens")
    parser.add_argument("--compressed", default="all",
                        help="comma-separated cache policies to compare with full, or 'all' (every eviction policy)")
    parser.add_argument("--budget", type=int, default=256, help="tokens kept per layer and KV head (default 256)")
    parser.add_argument("--tokens", type=int, default=16, help="decoded tokens per timed burst (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed bursts per configuration (default 3)")
    parser.add_argument("--model", default=None, help="default: embedded SmolLM2; 'tiny:llama' etc.")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter; cpu: the process's CPU time (time.process_time), which a "
                             "noisy shared machine disturbs far less (use with --threads 1)")
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    return parser.parse_args(argv)


class HostSyncs(TorchFunctionMode):
    """Counts torch calls that make the host read a value back from the device (see the module docstring)."""

    NAMES = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique",
             "unique_consecutive", "masked_select", "cpu", "numpy", "bincount", "argwhere"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES or (name == "__getitem__" and _bool_index(args)):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


class Decoding:
    """One configuration's session and decoding state."""

    def __init__(self, model, policy, clock=time.perf_counter):
        self.session = wb.Session(model, policy)
        self.next_token = None
        self.clock = clock

    def prefill(self, ids: list[int]) -> float:
        started = self.clock()
        self.next_token = int(self.session.feed(ids, "prefill")[-1].argmax())
        return self.clock() - started

    def burst(self, n: int) -> tuple[float, list[int]]:
        """Decode n tokens greedily; (seconds, tokens)."""
        tokens = []
        started = self.clock()
        for _ in range(n):
            tokens.append(self.next_token)
            self.next_token = int(self.session.feed([self.next_token], "decode")[-1].argmax())  # waits: the token
        return self.clock() - started, tokens

    def syncs_per_token(self, n: int) -> float:
        with HostSyncs() as counter:
            self.burst(n)
        return counter.count / n


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
    compressed = EVICTING if args.compressed == "all" else [c.strip() for c in args.compressed.split(",") if c.strip()]
    policies = {"full": wb.cache.get("full")}
    policies.update({name: wb.cache.get(name, budget=args.budget) for name in compressed})
    limit = model.max_positions
    if limit is not None and max(contexts) + args.tokens * (args.repeats + 2) > limit:
        sys.exit(f"error: the longest context plus decoded tokens passes the model's {limit} positions")
    print(f"model {model.name} on {model.device} ({str(model.dtype).removeprefix('torch.')}), torch "
          f"{torch.__version__} with {torch.get_num_threads()} threads, {args.clock} clock; budget {args.budget}; "
          f"compressed: "
          f"{', '.join(compressed)}")
    print(f"contexts {contexts}; {args.tokens} tokens per burst, 1 warm-up + {args.repeats} timed bursts per "
          "configuration, interleaved; then one counted burst", flush=True)

    rows = []
    for length in contexts:
        ids = context_ids(model, length)
        clock = time.process_time if args.clock == "cpu" else time.perf_counter
        runs = {name: Decoding(model, policy, clock) for name, policy in policies.items()}
        prefill = {name: d.prefill(ids) for name, d in runs.items()}
        first = {name: d.burst(args.tokens)[1] for name, d in runs.items()}  # warm-up
        speeds = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, d in runs.items():
                seconds, _ = d.burst(args.tokens)
                speeds[name].append(args.tokens / seconds)
        for name, d in runs.items():
            rows.append({"context": length, "policy": name, "tokens_per_s": statistics.median(speeds[name]),
                         "min": min(speeds[name]), "max": max(speeds[name]),
                         "host_syncs_per_token": d.syncs_per_token(args.tokens),
                         "cache_bytes": d.session.cache.nbytes(), "prefill_s": prefill[name],
                         "same_first_tokens_as_full": first[name] == first["full"]})
        done = [r for r in rows if r["context"] == length]
        print(f"  context {length}: " + ", ".join(f"{r['policy']} {r['tokens_per_s']:.1f}" for r in done),
              flush=True)

    print(f"\n{'context':>7} {'policy':<16} {'tok/s':>7} {'min..max':>13} {'x full':>7} {'syncs/tok':>9} "
          f"{'cache MiB':>10} {'x full':>7} {'prefill s':>10} {'same 1st burst':>15}")
    for r in rows:
        full = next(f for f in rows if f["context"] == r["context"] and f["policy"] == "full")
        r["speed_ratio"] = r["tokens_per_s"] / full["tokens_per_s"]
        r["bytes_ratio"] = r["cache_bytes"] / full["cache_bytes"]
        print(f"{r['context']:>7} {r['policy']:<16} {r['tokens_per_s']:>7.1f} "
              f"{r['min']:>6.1f}..{r['max']:<6.1f} {r['speed_ratio']:>7.2f} {r['host_syncs_per_token']:>9.1f} "
              f"{r['cache_bytes'] / 2**20:>10.2f} {r['bytes_ratio']:>7.3f} {r['prefill_s']:>10.2f} "
              f"{str(r['same_first_tokens_as_full']):>15}")
    if args.json:
        print(json.dumps({"model": model.name, "device": str(model.device), "threads": torch.get_num_threads(),
                          "budget": args.budget, "tokens": args.tokens, "repeats": args.repeats, "rows": rows},
                         indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
