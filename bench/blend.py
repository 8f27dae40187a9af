"""Benchmark: KV reuse beyond prefix sharing (wb.cacheblend, wb.ape) against full recomputation, in the same run.

A request of --chunks passages of datasets/harbor_town.txt (--words words each) after a short system prefix, then a
question. The chunks' KV are encoded once into a wb.ChunkCache (not timed: that is the reuse). Per method: time to
first token (full: the prefill of the whole request; cacheblend: the blend + the question's append; ape: the query
prefill over the parallel contexts), its ratio to full, greedy-token agreement with the full recomputation's answer
(the share of the first --tokens greedy tokens equal to it), and the perplexity of that reference answer under
each method (teacher-forced).

    .venv/bin/python bench/blend.py                       # about a minute on a 2-core CPU
    .venv/bin/python bench/blend.py --chunks 6 --words 150 --ratio 0.3
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

import workbench as wb
from workbench.eval.data import read_text

PREFIX = "You answer questions about the passages below.\n\n"
QUESTION = "\n\nQuestion: What happens at the harbor in the morning?\nAnswer:"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=4, help="passages in the request")
    parser.add_argument("--words", type=int, default=120, help="words per passage")
    parser.add_argument("--tokens", type=int, default=16, help="answer tokens compared")
    parser.add_argument("--ratio", type=float, default=0.15, help="cacheblend's recompute ratio")
    parser.add_argument("--repeats", type=int, default=3, help="timings per method; the fastest counts")
    return parser.parse_args(argv)


def ids(model, text) -> list[int]:
    return model.tokenizer(text, add_special_tokens=False)["input_ids"]


def main(argv=None) -> int:
    args = parse_args(argv)
    model = wb.load()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {model.name}")
    words = read_text().split()
    chunks = [" ".join(words[i * args.words:(i + 1) * args.words]) for i in range(args.chunks)]
    prefix, question = ids(model, PREFIX), ids(model, QUESTION)
    store = wb.ChunkCache()
    for chunk in chunks:
        store.encode(model, chunk, prefix)  # the stored KV every request reuses
    request = prefix + [t for c in chunks for t in ids(model, c)]

    def full():
        session = wb.Session(model)
        started = time.perf_counter()
        logits = session.feed(request + question, "prefill")
        return session, logits, time.perf_counter() - started

    def blend():
        started = time.perf_counter()
        blended = wb.cacheblend(model, chunks, prefix=prefix, store=store, recompute_ratio=args.ratio)
        logits = blended.session.feed(question, "append")
        return blended.session, logits, time.perf_counter() - started

    def ape():
        started = time.perf_counter()
        contexts = wb.ape(model, chunks, prefix=prefix, store=store)
        logits = contexts.feed(question)
        return contexts, logits, time.perf_counter() - started

    def feed(state, tokens, logits="last"):
        if isinstance(state, wb.Session):
            return state.feed(tokens, "decode" if len(tokens) == 1 and logits == "last" else "append", logits=logits)
        return state.feed(tokens, logits=logits)

    def greedy(state, logits):
        tokens = [int(logits[-1].argmax())]
        while len(tokens) < args.tokens:
            tokens.append(int(feed(state, [tokens[-1]])[-1].argmax()))
        return tokens

    methods = {"full": full, "cacheblend": blend, "ape": ape}
    seconds = {name: min(method()[2] for _ in range(args.repeats)) for name, method in methods.items()}
    reference = greedy(*full()[:2])
    print(f"\nrequest: {len(request)} tokens ({args.chunks} chunks after a {len(prefix)}-token prefix) + "
          f"{len(question)}-token question; cacheblend ratio {args.ratio}, ape T = S = 0.9")
    print(f"{'method':>12}{'TTFT (ms)':>12}{'speed-up':>10}{'agreement':>11}{'answer ppl':>12}")
    for name, method in methods.items():
        tokens = greedy(*method()[:2])
        agree = sum(a == b for a, b in zip(tokens, reference)) / len(reference)
        state, logits, _ = method()  # the reference answer teacher-forced: perplexity of its tokens
        rows = torch.cat([logits[-1:], feed(state, reference[:-1], "all")])
        logp = torch.log_softmax(rows, -1)[torch.arange(len(reference)), torch.tensor(reference)]
        ppl = math.exp(float(-logp.mean()))
        print(f"{name:>12}{seconds[name] * 1e3:>12.0f}{seconds['full'] / seconds[name]:>9.2f}x{agree:>11.2f}"
              f"{ppl:>12.2f}")
    print(f"\n{store}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
