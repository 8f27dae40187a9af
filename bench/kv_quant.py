"""Benchmark: quantized KV caches against the full cache, HF transformers' QuantizedCache and eviction at equal memory.

On the embedded SmolLM2-135M (CPU, float32), for each configuration:
  perplexity  of a continuation given a context held in the cache (datasets/harbor_town.txt, an offset per seed;
              the continuation is teacher-forced one token per decode pass, so the residual flushes as it would
              while generating), and its difference from the full cache's;
  passkey     retrieval accuracy at --passkey tokens (greedy reply);
  bytes       what the cache holds after the context's prefill, by part, and bits per key/value element held
              (codes, scales, zeros and the full-precision residual all counted);
  decode      greedy decode tokens/s after the context and its ratio to the full cache's (bench/cache.py's
              `Decoding`: one warm-up burst, then --repeats timed bursts per cache, interleaved; the median).
Eviction policies run at the token budget whose bytes equal kivi-2's after the context, and the mixed-precision
caches (mikv, zipcache) at kivi-2's bytes (equal memory). xquant (the layer input, K and V recomputed) and
shadowkv (low-rank keys; it saves bandwidth, not bytes) are scored beside them.
HF's QuantizedCache (quanto backend: keys and values per token, the whole cache dequantized every step) is scored
the same way on the same samples when optimum-quanto is installed (`.venv/bin/pip install optimum-quanto`; its C++
extension compiles once, about two minutes).

Targets (issue 12): KIVI-4 within 0.1 and KIVI-2 within 1.0 perplexity of the full cache.

    .venv/bin/python bench/kv_quant.py
    .venv/bin/python bench/kv_quant.py --context 1024 --continuation 256 --seeds 3 --passkey 2000
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys

import statistics

import torch

import workbench as wb
from cache import Decoding  # bench/cache.py: this directory is on sys.path when a script here runs
from workbench.eval.harness import first_prompt
from workbench.eval.tasks import Passkey, Perplexity

QUANTIZED = [("kivi", {"bits": 4}), ("kivi", {"bits": 2}),
             ("int_per_token", {"bits": 8}), ("int_per_token", {"bits": 4}), ("int_per_token", {"bits": 2}),
             ("kvquant", {"bits": 4}), ("kvquant", {"bits": 3}), ("kvquant", {"bits": 2}), ("fp8", {}),
             ("xquant", {"bits": 8}), ("xquant", {"bits": 4}), ("xquant", {"bits": 2}), ("shadowkv", {})]
MIXED = ["mikv", "zipcache"]  # at kivi-2's bytes (budget_bytes)
EVICTING = ["snapkv", "h2o", "streaming_llm"]
TARGETS = {"kivi(bits=4)": 0.1, "kivi(bits=2)": 1.0}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=512, help="perplexity context tokens (default 512)")
    parser.add_argument("--continuation", type=int, default=256, help="scored tokens (default 256)")
    parser.add_argument("--passkey", type=int, default=2000, help="passkey prompt tokens (default 2000; 0: skip)")
    parser.add_argument("--seeds", type=int, default=2, help="samples per task (default 2)")
    parser.add_argument("--extra", default="", help="more policies, comma-separated name or name:key=value;...")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--decode-tokens", type=int, default=16, help="tokens per timed decode burst (0: skip)")
    parser.add_argument("--repeats", type=int, default=3, help="timed decode bursts per cache")
    return parser.parse_args(argv)


def parse_extra(text: str) -> list[tuple[str, dict]]:
    out = []
    for entry in filter(None, text.split(",")):
        name, _, params = entry.partition(":")
        pairs = (p.split("=", 1) for p in filter(None, params.split(";")))
        out.append((name, {k: _number(v) for k, v in pairs}))
    return out


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def prefill_bytes(model, policy, ids) -> dict[str, int]:
    """What the cache holds after prefilling `ids`, by part."""
    with wb.Session(model, policy) as session:
        session.feed(ids, "prefill", logits="none")
        return session.cache.nbytes_by_component()


# -- HF transformers' QuantizedCache (quanto), on the same samples ------------------------------------------------
def hf_quantized_cache(model, bits: int):
    from transformers import QuantizedCache
    return QuantizedCache(backend="quanto", config=model.hf.config, nbits=bits, q_group_size=64, residual_length=128)


def hf_perplexity(model, context_ids, continuation_ids, bits: int) -> float:
    cache, nll = hf_quantized_cache(model, bits), 0.0
    with torch.inference_mode():
        logits = model.hf(input_ids=torch.tensor([context_ids]), cache=cache, use_cache=True).logits[0, -1:]
        for i, target in enumerate(continuation_ids):
            nll -= float(torch.log_softmax(logits[-1].double(), -1)[target])
            if i + 1 < len(continuation_ids):
                logits = model.hf(input_ids=torch.tensor([[target]]), cache=cache, use_cache=True).logits[0]
    return math.exp(nll / len(continuation_ids))


def hf_passkey(model, sample, bits: int) -> float:
    ids = torch.tensor([first_prompt(model, sample)])
    with torch.inference_mode():
        out = model.hf.generate(ids, cache=hf_quantized_cache(model, bits), max_new_tokens=16, do_sample=False)
    reply = model.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return float(sample.answers[0] in reply)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = wb.load()
    text_task = Perplexity(context=args.context, continuation=args.continuation)
    tasks = [text_task] + ([Passkey(length=args.passkey)] if args.passkey else [])
    context = text_task.make(model.tokenizer, 0).context_ids

    full = sum(prefill_bytes(model, "full", context).values())
    kivi2 = sum(prefill_bytes(model, wb.cache.get("kivi", bits=2), context).values())
    budget = round(kivi2 / (full / len(context)))  # tokens per layer and KV head holding kivi-2's bytes
    print(f"{len(context)}-token context: full cache {full / 2**20:.2f} MiB, kivi-2 {kivi2 / 2**20:.2f} MiB -> "
          f"eviction at budget {budget} (equal memory)\n", file=sys.stderr)
    configs = ["full", *QUANTIZED, *((name, {"budget_bytes": kivi2}) for name in MIXED),
               *((name, {"budget": budget, "window": 16}) for name in EVICTING), *parse_extra(args.extra)]
    ds = wb.eval.evaluate(model, configs, tasks, seeds=args.seeds)

    rows = []
    for label in ds["policy"].values:
        cell = ds.sel(policy=label).isel(budget=0) if ds.sizes["budget"] == 1 else ds.sel(policy=label).max("budget")
        name, params = _config(configs, label)
        parts = prefill_bytes(model, wb.cache.get(name, **params) if params else name, context)
        held = sum(parts.values())
        ppl = float(cell["perplexity"].sel(task=text_task.label).mean())
        accuracy = float(cell["accuracy"].sel(task=tasks[1].label).mean()) if args.passkey else math.nan
        rows.append((label, 8 * held / _elements(model, len(context)), held, ppl, accuracy, parts))

    quanto = importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None
    if not quanto:
        print("optimum-quanto is not installed: no HF QuantizedCache rows (.venv/bin/pip install optimum-quanto)\n",
              file=sys.stderr)
    if quanto:
        for bits in (4, 2):
            ppls, hits = [], []
            for seed in range(args.seeds):
                sample = text_task.make(model.tokenizer, seed)
                ppls.append(hf_perplexity(model, sample.context_ids, sample.continuation_ids, bits))
                if args.passkey:
                    hits.append(hf_passkey(model, tasks[1].make(model.tokenizer, seed), bits))
            rows.append((f"HF QuantizedCache quanto {bits}-bit", math.nan, math.nan, sum(ppls) / len(ppls),
                         sum(hits) / len(hits) if hits else math.nan, {}))

    base = rows[0][3]
    print(f"| cache | bits / element held | bytes after {len(context)} tokens | vs full | perplexity | "
          f"vs full | passkey {args.passkey} |")
    print("|---|---|---|---|---|---|---|")
    for label, bits, held, ppl, accuracy, _ in rows:
        size = "n/a" if math.isnan(held) else f"{held / 2**20:.2f} MiB"
        ratio = "" if math.isnan(held) else f"{full / held:.2f}x smaller" if held < full else "1.00x"
        print(f"| {label} | {'n/a' if math.isnan(bits) else f'{bits:.2f}'} | {size} | {ratio} | {ppl:.3f} | "
              f"{ppl - base:+.3f} | {accuracy:.2f} |")
    print("\nbytes by part after the context:")
    for label, _, _, _, _, parts in rows:
        if parts:
            print(f"  {label}: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in parts.items()))
    for label, limit in TARGETS.items():
        delta = next(ppl - base for name, _, _, ppl, _, _ in rows if name == label)
        print(f"target {label}: perplexity {delta:+.3f} vs full (within {limit}): {'met' if delta <= limit else 'MISSED'}")
    print(f"\n({args.seeds} seeds; perplexity context {args.context} + {args.continuation} tokens)")
    if args.decode_tokens:
        decode_speeds(model, configs, context, args.decode_tokens, args.repeats)


def decode_speeds(model, configs, context: list[int], tokens: int, repeats: int) -> None:
    """Greedy decode tokens/s of every cache after `context`, interleaved bursts, against the full cache."""
    runs = {}
    for entry in configs:
        name, params = (entry, {}) if isinstance(entry, str) else entry
        runs[_label(name, params)] = Decoding(model, wb.cache.get(name, **params))
    for run in runs.values():
        run.prefill(context)
        run.burst(tokens)  # warm-up
    speeds = {label: [] for label in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            speeds[label].append(tokens / run.burst(tokens)[0])
    full = statistics.median(speeds["full"])
    print(f"\ndecode after {len(context)} tokens ({tokens}-token bursts, median of {repeats}, interleaved):")
    print("| cache | tokens/s | vs full |\n|---|---|---|")
    for label, values in speeds.items():
        median = statistics.median(values)
        print(f"| {label} | {median:.1f} | {median / full:.2f}x |")


def _label(name: str, params: dict) -> str:
    """The label wb.eval gives a configuration (its budget is an axis of its own)."""
    extra = ", ".join(f"{k}={v}" for k, v in sorted(params.items()) if k != "budget")
    return f"{name}({extra})" if extra else name


def _config(configs, label: str) -> tuple[str, dict]:
    for entry in configs:
        name, params = (entry, {}) if isinstance(entry, str) else entry
        if label == _label(name, params):
            return name, params
    raise KeyError(label)


def _elements(model, tokens: int) -> int:
    """Key and value elements of `tokens` tokens over every layer and KV head."""
    text = model.hf.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * tokens * text.num_hidden_layers * text.num_key_value_heads * head_dim


if __name__ == "__main__":
    main()
