"""Benchmark: is a KIVI perplexity gap the model's or the implementation's? workbench's `kivi` against KIVI simulated
on transformers' own DynamicCache, on the same samples.

The simulation shares no code with workbench's caches: after every forward pass of the unmodified HF model, each
layer's cached keys and values are replaced by what KIVI's rule keeps (its reference code, jy-yuan/KIVI
models/llama_kivi.py): keys of the first T - T mod R tokens quantized per channel over groups of G tokens, values
of all but the newest R tokens per token over groups of G channels (min/max asymmetric, quantized and dequantized
from the float originals), the rest exact. It also quantizes keys only or values only, to attribute the gap, and
(`--per-layer`) one layer at a time.

    .venv/bin/python bench/kivi_simulated.py
    .venv/bin/python bench/kivi_simulated.py --bits 2 --context 512 --continuation 128 --seeds 2 --per-layer
"""

from __future__ import annotations

import argparse
import math

import torch
from transformers import DynamicCache

import workbench as wb
from workbench.eval.tasks import Perplexity


def fake_quantized(x: torch.Tensor, bits: int, group: int, per_channel: bool) -> torch.Tensor:
    """x (batch, heads, tokens, D) quantized and dequantized over groups of `group` tokens per channel (keys) or
    `group` channels per token (values)."""
    b, h, t, d = x.shape
    g = x.reshape(b, h, t // group, group, d) if per_channel else x.reshape(b, h, t, d // group, group)
    axis = 3 if per_channel else 4
    low, high = g.amin(axis, keepdim=True), g.amax(axis, keepdim=True)
    scale = ((high - low) / (2 ** bits - 1)).clamp_min(1e-12)
    return (((g - low) / scale).round().clamp(0, 2 ** bits - 1) * scale + low).reshape(x.shape)


def simulated_perplexity(model, context: list[int], continuation: list[int], key_bits: int, value_bits: int,
                         group: int, residual: int, layers: set[int] | None = None) -> float:
    """Perplexity of `continuation` (teacher-forced one token per pass) with the HF cache holding what KIVI keeps;
    0 bits: that side exact; `layers`: only these layers quantized."""
    cache, floats, nll = DynamicCache(config=model.hf.config), {}, 0.0
    with torch.inference_mode():
        for i, ids in enumerate([context] + [[t] for t in continuation[:-1]]):
            logits = model.hf(input_ids=torch.tensor([ids]), cache=cache, use_cache=True).logits[0, -1]
            nll -= float(torch.log_softmax(logits.double(), -1)[continuation[i]])
            for index, layer in enumerate(cache.layers):
                new = (layer.keys[..., -len(ids):, :], layer.values[..., -len(ids):, :])
                floats[index] = [torch.cat(p, 2) for p in zip(floats[index], new)] if index in floats else list(new)
                if layers is not None and index not in layers:
                    continue
                keys, values = (x.clone() for x in floats[index])
                total = keys.shape[2]
                k, v = total - total % residual, max(0, total - residual)
                if key_bits and k:
                    keys[..., :k, :] = fake_quantized(floats[index][0][..., :k, :], key_bits, group, True)
                if value_bits and v:
                    values[..., :v, :] = fake_quantized(floats[index][1][..., :v, :], value_bits, group, False)
                layer.keys, layer.values = keys, values
    return math.exp(nll / len(continuation))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=2, help="KIVI bits (default 2)")
    parser.add_argument("--group", type=int, default=32, help="G (default 32)")
    parser.add_argument("--residual", type=int, default=128, help="R (default 128)")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--per-layer", action="store_true", help="also quantize one layer at a time")
    args = parser.parse_args(argv)
    model = wb.load()
    task = Perplexity(context=args.context, continuation=args.continuation)
    samples = [task.make(model.tokenizer, seed) for seed in range(args.seeds)]

    def mean(key_bits, value_bits, layers=None):
        return sum(simulated_perplexity(model, s.context_ids, s.continuation_ids, key_bits, value_bits, args.group,
                                        args.residual, layers) for s in samples) / len(samples)

    kivi = ("kivi", {"bits": args.bits, "group": args.group, "residual": args.residual})
    ds = wb.eval.evaluate(model, ["full", kivi], [task], seeds=args.seeds)
    ppl = ds["perplexity"].sel(task=task.label).mean("seed").isel(budget=0)
    full, ours = float(ppl.sel(policy="full")), float(ppl.isel(policy=1))
    rows = [(f"workbench kivi-{args.bits}", ours), (f"simulated KIVI-{args.bits} (keys and values)",
                                                   mean(args.bits, args.bits)),
            (f"simulated, keys only at {args.bits} bits", mean(args.bits, 0)),
            (f"simulated, values only at {args.bits} bits", mean(0, args.bits))]
    simulated_full = mean(0, 0)
    print(f"full cache: workbench {full:.3f}, HF DynamicCache {simulated_full:.3f}\n")
    print("| cache | perplexity | vs full |\n|---|---|---|")
    for label, value in rows:
        print(f"| {label} | {value:.3f} | {value - full:+.3f} |")
    if args.per_layer:
        print("\n| layer quantized alone (keys and values) | vs full |\n|---|---|")
        for layer in range(model.hf.config.num_hidden_layers):
            print(f"| {layer} | {mean(args.bits, args.bits, {layer}) - full:+.3f} |", flush=True)
    print(f"\n({args.seeds} seeds; context {args.context} + {args.continuation} tokens; G={args.group}, "
          f"R={args.residual})")


if __name__ == "__main__":
    main()
