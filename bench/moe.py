"""Benchmark: expert caches, expert prediction and routing consistency on a real routing trace, in one process.

The trace: the embedded SmolLM2 MoEfied (wb.moefy: a shared expert of a quarter of the neurons, 12 routed experts
per layer, 4 active: half the feed-forward compute, as notebook 04), greedy decoding of --tokens
new tokens after a passage of datasets/harbor_town.txt, record="routing" (prompt and generated tokens, 30 MoE
layers). Printed:
  - simulator throughput (token-layer events per second) of every policy on that trace tiled to --events, with
    LRU's one-pass stack-distance curve against simulating each size (the peer, same run) as a ratio;
  - the hit-rate table of every policy (and Fate's allocation, prefetch from Fate's predictor) at cache sizes of
    1x..4x the active experts per layer, with the estimated time per token under the CPU-laptop cost model;
  - each predictor's precision and recall (mean over layers) against the experts actually used;
  - SRP and SCH at the paper's segment lengths 4 / 16 / 64 / 256;
  - the fused MoE kernel against transformers' grouped_mm / batched_mm / eager experts where a GPU is present
    (bench/fused_moe.py; says so and skips it without one).

    .venv/bin/python bench/moe.py                  # under a minute on a 2-core CPU
    .venv/bin/python bench/moe.py --tokens 64 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

import workbench as wb
from workbench.eval.data import read_text
from workbench.routers import consistency, expert_cache, prediction
from workbench.routers.events import routing_events

POLICIES = ("lru", "lfu", "arc", "score", "belady")
SIZES = (1.0, 1.5, 2.0, 3.0, 4.0)  # cache size in units of the active experts per layer


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="new tokens decoded for the trace (default 128)")
    parser.add_argument("--prompt-words", type=int, default=150, help="words of the passage in the prompt")
    parser.add_argument("--experts", type=int, default=12)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--shared", type=float, default=0.25, help="share of the neurons in the shared expert")
    parser.add_argument("--events", type=int, default=200_000, help="token-layer events for the throughput test")
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def routing_trace(args) -> tuple[np.ndarray, np.ndarray, object]:
    model = wb.moefy(wb.load(), experts=args.experts, top_k=args.top_k, shared=args.shared)
    passage = " ".join(read_text().split()[:args.prompt_words])
    prompt = [{"role": "user", "content": f"Continue this story:\n\n{passage}"}]
    run = wb.generate(model, prompt, max_new_tokens=args.tokens, ignore_eos=True, record="routing")
    return routing_events(run.trace), prediction.fate(run.trace), model


def throughput(events: np.ndarray, target: int) -> dict[str, float]:
    tiled = np.concatenate([events] * max(1, -(-target // (events.shape[0] * events.shape[1]))))
    n = tiled.shape[0] * tiled.shape[1]
    k = events.shape[-1]
    rates = {}
    for policy in POLICIES:
        started = time.perf_counter()
        expert_cache.simulate(tiled, policy, 2 * k)
        rates[policy] = n / (time.perf_counter() - started)
    sizes = [int(a * k) for a in SIZES]
    started = time.perf_counter()
    one_pass = expert_cache.hit_rates(tiled, sizes)
    rates["lru curve, one pass"] = n / (time.perf_counter() - started)
    started = time.perf_counter()
    per_size = [expert_cache.simulate(tiled, "lru", c).hit_rate for c in sizes]
    rates["lru curve, per size"] = n / (time.perf_counter() - started)
    assert np.allclose(one_pass.hit_rate, per_size)
    return rates, n


def hit_rate_table(events, fate, cost) -> list[dict]:
    k = events.shape[-1]
    layers = len([layer for layer in range(events.shape[1]) if (events[:, layer] >= 0).any()])
    rows = []
    configs = {policy: dict(policy=policy) for policy in POLICIES}
    configs["arc + fate prefetch"] = dict(policy="arc", prefetch=fate)
    configs["lru + fate prefetch"] = dict(policy="lru", prefetch=fate)
    for name, config in configs.items():
        for size in SIZES:
            result = expert_cache.simulate(events, capacity_in_active=size, cost=cost, **config)
            rows.append({"policy": name, "size": size, "hit_rate": result.hit_rate,
                         "seconds_per_token": result.seconds / events.shape[0]})
    for size in SIZES:  # Fate's shallow-favouring split of the same total, ARC in each layer (as Fate runs)
        total = int(size * k) * layers
        result = expert_cache.simulate(events, "arc", expert_cache.FateAllocation(total), cost=cost)
        rows.append({"policy": "fate allocation (arc)", "size": size, "hit_rate": result.hit_rate,
                     "seconds_per_token": result.seconds / events.shape[0]})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    started = time.perf_counter()
    events, fate, model = routing_trace(args)
    k = events.shape[-1]
    print(f"trace: {model.name}, {events.shape[0]} tokens x {events.shape[1]} layers x k={k} "
          f"({time.perf_counter() - started:.0f} s to MoEfy and decode)")
    config = model.hf.config
    neurons = model.hf.model.layers[0].mlp.experts.intermediate_dim  # per routed expert
    expert_bytes = expert_cache.swiglu_expert_bytes(config.hidden_size, neurons)
    cost = expert_cache.CostModel.cpu_laptop(expert_bytes)
    results: dict = {}

    rates, n = throughput(events, args.events)
    results["throughput"] = rates
    print(f"\nsimulator throughput on {n} token-layer events (the trace tiled)")
    for name, rate in rates.items():
        print(f"  {name:<22}{rate / 1e3:>10.0f}k events/s")
    print(f"  one-pass LRU curve vs per-size simulation: "
          f"{rates['lru curve, one pass'] / rates['lru curve, per size']:.1f}x")

    rows = hit_rate_table(events, fate, cost)
    results["hit_rates"] = rows
    print(f"\nhit rate by cache size (x active experts per layer = x{k} slots), cost model {cost.name} "
          f"({expert_bytes / 1e6:.2f} MB per expert); ms per token in brackets")
    print(f"  {'policy':<24}" + "".join(f"{s:>16.1f}x" for s in SIZES))
    for name in dict.fromkeys(r["policy"] for r in rows):
        cells = [r for r in rows if r["policy"] == name]
        print(f"  {name:<24}" + "".join(f"{c['hit_rate']:>9.3f} ({c['seconds_per_token'] * 1e3:>4.1f})"
                                        for c in cells))

    half = events.shape[0] // 2  # predictors fitted on the first half are scored on the second
    predicted = {
        "fate": fate[half:],
        "transition (ExFlow)": prediction.transition(events[half:], events[:half]),
        "previous token": prediction.previous_token(events[half:]),
        "frequency": prediction.frequency(events[half:], events[:half]),
    }
    results["prediction"] = {}
    print(f"\nexpert prediction on the trace's second half ({events.shape[0] - half} tokens; fitted on the first)")
    for name, guess in predicted.items():
        precision, recall = prediction.precision_recall(guess, events[half:])
        results["prediction"][name] = {"precision": float(np.nanmean(precision)), "recall": float(np.nanmean(recall))}
        print(f"  {name:<22} precision {np.nanmean(precision):.3f}  recall {np.nanmean(recall):.3f}")

    results["consistency"] = {}
    print("\nlocal routing consistency (mean over layers): SRP, and SCH at a cache of 2x the active experts")
    for length in consistency.PAPER_LENGTHS:
        if length > events.shape[0]:
            continue
        srp = float(np.nanmean(consistency.segment_routing_performance(events, length)))
        sch = float(np.nanmean(consistency.segment_cache_hit_rate(events, length, capacity_in_active=2.0)))
        results["consistency"][length] = {"srp": srp, "sch": sch}
        print(f"  m = {length:<4} SRP {srp:.3f}   SCH {sch:.3f}")

    if torch.cuda.is_available():
        import fused_moe as fused_moe_bench  # bench/fused_moe.py (this script's folder is on sys.path)
        print("\nfused MoE kernel against transformers' experts implementations (bench/fused_moe.py)")
        fused_moe_bench.main(["--tokens", "1,16,128"])
    else:
        print("\nfused MoE kernel: bench/fused_moe.py compares it on a GPU; no GPU here, skipped")
    if args.json:
        print(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
