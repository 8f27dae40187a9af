"""Benchmark: prefix sharing (wb.PrefixCache) in a multi-turn chat, against prefilling every turn from scratch.

A chat of --turns user turns after a long system prompt (a passage of datasets/harbor_town.txt); each turn's prompt
is the whole conversation so far. Per turn, in the same run: time to first token (the prefill, or the append of
what follows the reused prefix), prompt tokens, tokens reused, and whether the reply equals the from-scratch one.

    .venv/bin/python bench/prefix.py                  # under a minute on a 2-core CPU
    .venv/bin/python bench/prefix.py --turns 6 --words 300
"""

from __future__ import annotations

import argparse
import sys

import torch

import workbench as wb
from workbench.eval.data import read_text

QUESTIONS = ["Who lives in the town?", "What happens at the harbor in the morning?", "Describe the lighthouse.",
             "What do people eat there?", "How does the story end?", "Summarize it in one sentence."]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=4, help="user turns (default 4, at most 6)")
    parser.add_argument("--words", type=int, default=250, help="words of the passage in the system prompt")
    parser.add_argument("--tokens", type=int, default=24, help="reply tokens per turn")
    parser.add_argument("--repeats", type=int, default=3, help="timings per turn; the fastest counts")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    model = wb.load()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {model.name}")
    passage = " ".join(read_text().split()[:args.words])
    chat = [{"role": "system", "content": f"Answer questions about this story.\n\n{passage}"}]
    caches = [wb.PrefixCache() for _ in range(args.repeats)]  # one per repeat: each sees the same conversation
    print(f"\n{'turn':>4}{'prompt':>8}{'reused':>8}{'TTFT full (ms)':>16}{'TTFT reused (ms)':>18}{'speed-up':>10}"
          f"{'same reply':>12}")
    equal = True
    for turn, question in enumerate(QUESTIONS[:args.turns]):
        chat.append({"role": "user", "content": question})
        full = [wb.generate(model, chat, max_new_tokens=args.tokens) for _ in range(args.repeats)]
        runs = [wb.generate(model, chat, max_new_tokens=args.tokens, prefixes=cache) for cache in caches]
        reused = min(runs, key=lambda r: r.prefill_seconds)
        same = reused.token_ids == full[0].token_ids
        equal &= same
        full_ms = min(r.prefill_seconds for r in full) * 1e3
        reused_ms = reused.prefill_seconds * 1e3
        print(f"{turn + 1:>4}{len(reused.prompt_ids):>8}{reused.config['prefix_reused']:>8}{full_ms:>16.0f}"
              f"{reused_ms:>18.0f}{full_ms / reused_ms:>9.1f}x{str(same):>12}")
        chat.append({"role": "assistant", "content": full[0].text})
    print(f"\n{caches[0]}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
