"""Train the Medusa heads shipped for the embedded model: self-distillation on CPU in a few minutes.

Medusa-1 (Cai et al., 2024) with self-distillation: the base model, frozen, writes greedy replies to a few dozen
short instructions below; the heads learn to predict the model's own tokens. From the final hidden state h_t of
each reply position t (the last prompt token included), head i (1..K) predicts token t+1+i with the base model's
LM head after its residual block (workbench.decode.medusa.MedusaHeads); the loss is cross-entropy against those
tokens, head i weighted 0.8^(i-1) as in the reference. Hidden states are computed once; only the heads train.
One prompt in five is held out: its replies give the per-head top-1 accuracy written to the provenance file.

    .venv/bin/python bench/train_medusa.py                 # 4 heads -> workbench/models/medusa/<model>.pt/.json
    .venv/bin/python bench/train_medusa.py --heads 3 --epochs 6 --out /tmp/heads.pt

Departures: hard labels (the model's greedy tokens: what greedy verification accepts) rather than the reference's
distillation from the base model's soft distribution; replies are generated as one left-padded batch with
transformers' generate (the base model's argmax agreement with them, unpadded, is reported); a few thousand tokens
instead of ShareGPT, so the heads learn common phrasing, not much more.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import workbench as wb
from workbench.decode.medusa import MedusaHeads, heads_path

PROMPTS = [
    "Explain photosynthesis in two sentences.",
    "What is the capital of Australia, and why was it chosen?",
    "Give three tips for sleeping better.",
    "Write a haiku about autumn leaves.",
    "How does a refrigerator keep food cold?",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "List five fruits that are high in vitamin C.",
    "What is the difference between weather and climate?",
    "Write a Python function that returns the factorial of n.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Why is the sky blue?",
    "Give me a short recipe for pancakes.",
    "What are the main causes of the French Revolution?",
    "Describe a cat to someone who has never seen one.",
    "Explain what a black hole is to a ten-year-old.",
    "Write a polite email declining a meeting invitation.",
    "What is machine learning?",
    "Name the planets of the solar system in order.",
    "How do vaccines work?",
    "Rewrite this sentence in the passive voice: The chef cooked a delicious meal.",
    "Correct the grammar: 'She don't like going to school on mondays.'",
    "Repeat the following sentence exactly: The quick brown fox jumps over the lazy dog.",
    "Summarize this text: The city council met on Tuesday to discuss the new park. Residents asked for more "
    "trees, a playground and better lighting. The council agreed to fund the playground this year.",
    "Turn this list into a sentence: apples, bread, milk, eggs.",
    "What are the benefits of regular exercise?",
    "Explain the water cycle step by step.",
    "Write a short story about a robot who learns to paint.",
    "What is the Pythagorean theorem? Give an example.",
    "How can I improve my public speaking skills?",
    "Compare cats and dogs as pets.",
    "What does HTML stand for, and what is it used for?",
    "Give a one-paragraph history of the printing press.",
    "Explain how compound interest works with an example.",
    "Write a limerick about a forgetful wizard.",
    "What should I pack for a weekend hiking trip?",
    "Describe the taste of chocolate.",
    "Extract the names from this sentence: Alice met Bob and Carol at the station.",
    "What is the boiling point of water at sea level in Celsius and Fahrenheit?",
    "Explain the rules of chess briefly.",
    "Write a SQL query that selects all users older than 30.",
]


def replies(model, prompts: list[str], tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, greedy reply ids up to and including the first end-of-sequence token) per prompt."""
    tokenizer = model.tokenizer
    encoded = [model.encode([{"role": "user", "content": p}])[0].tolist() for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(model.eos_token_ids)
    width = max(map(len, encoded))
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    with torch.inference_mode():
        out = model.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False,
                                pad_token_id=pad)
    pairs = []
    for prompt, row in zip(encoded, out[:, width:].tolist()):
        ends = [i for i, t in enumerate(row) if t in model.eos_token_ids]
        pairs.append((prompt, row[:ends[0] + 1] if ends else row))
    return pairs


def examples(model, pairs, heads: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Hidden states (n, hidden) at every reply position t (from the last prompt token on), the tokens t+2..
    t+1+heads after each (n, heads; -100 past the end), and how often the base model's own argmax at t is t+1."""
    hidden, labels, agree, total = [], [], 0, 0
    for prompt, reply in pairs:
        seq = prompt + reply
        with torch.inference_mode():
            out = model.hf(input_ids=torch.tensor([seq]), output_hidden_states=True)
        first = len(prompt) - 1
        hidden.append(out.hidden_states[-1][0, first:len(seq) - 1].float())
        base = out.logits[0, first:len(seq) - 1].argmax(-1)
        agree += int((base == torch.tensor(seq[first + 1:])).sum())
        total += len(reply)
        for t in range(first, len(seq) - 1):
            labels.append([seq[t + 1 + i] if t + 1 + i < len(seq) else -100 for i in range(1, heads + 1)])
    return torch.cat(hidden), torch.tensor(labels), agree / max(total, 1)


def head_logits(heads: MedusaHeads, lm_head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return heads(hidden, lm_head)  # (heads, n, vocab)


def accuracy(heads: MedusaHeads, lm_head, hidden, labels, batch: int = 256) -> list[float]:
    """Per head: top-1 accuracy over the positions that have a label."""
    right = torch.zeros(heads.num_heads)
    with torch.no_grad():
        for start in range(0, len(hidden), batch):
            best = head_logits(heads, lm_head, hidden[start:start + batch]).argmax(-1).T  # (n, heads)
            right += (best == labels[start:start + batch]).sum(0).float()
    return (right / (labels != -100).sum(0).clamp_min(1)).tolist()


def train(heads, lm_head, hidden, labels, epochs: int, lr: float, weight_decay: float, batch: int,
          seed: int) -> list[float]:
    """AdamW with a cosine schedule; returns the mean loss of each epoch."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(hidden) / batch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    weights = torch.tensor([0.8 ** i for i in range(heads.num_heads)])
    losses = []
    for _ in range(epochs):
        order, total = torch.randperm(len(hidden), generator=generator), 0.0
        for start in range(0, len(hidden), batch):
            index = order[start:start + batch]
            logits = head_logits(heads, lm_head, hidden[index])  # (heads, b, vocab)
            loss = sum(w * torch.nn.functional.cross_entropy(l, y, ignore_index=-100, reduction="sum")
                       / (y != -100).sum().clamp_min(1) for w, l, y in zip(weights, logits, labels[index].T))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(index)
        losses.append(total / len(hidden))
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64, help="reply length (greedy, stops at EOS)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's, towards W = 0 (the LM head)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: workbench/models/medusa/<model>.pt")
    parser.add_argument("--replies", type=Path, default=None,
                        help="a JSON file of the generated replies: read if it exists, else written (reruns skip "
                             "the generation, the slow part)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    model = wb.load(device="cpu")
    model.hf.requires_grad_(False)
    lm_head = model.hf.get_output_embeddings()
    held = [p for i, p in enumerate(PROMPTS) if i % 5 == 4]
    kept = [p for i, p in enumerate(PROMPTS) if i % 5 != 4]
    if args.replies is not None and args.replies.is_file():
        pairs = [tuple(pair) for pair in json.loads(args.replies.read_text())]
    else:
        pairs = replies(model, PROMPTS, args.tokens)
        if args.replies is not None:
            args.replies.write_text(json.dumps(pairs))
    print(f"replies: {sum(len(r) for _, r in pairs)} tokens in {time.perf_counter() - started:.0f} s", flush=True)
    train_pairs = [pair for p, pair in zip(PROMPTS, pairs) if p in kept]
    held_pairs = [pair for p, pair in zip(PROMPTS, pairs) if p in held]
    x, y, agree = examples(model, train_pairs, args.heads)
    hx, hy, held_agree = examples(model, held_pairs, args.heads)
    print(f"examples: {len(x)} train, {len(hx)} held out; base argmax agrees with the batched replies on "
          f"{agree:.1%} / {held_agree:.1%}", flush=True)

    heads = MedusaHeads(model.text_config.hidden_size, args.heads)
    before = accuracy(heads, lm_head, hx, hy)  # zero-initialised: each head is the LM head itself
    losses = train(heads, lm_head, x, y, args.epochs, args.lr, args.weight_decay, args.batch, args.seed)
    after, train_after = accuracy(heads, lm_head, hx, hy), accuracy(heads, lm_head, x, y)
    out = args.out or heads_path(model.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    heads.save(out, model.name)
    seconds = time.perf_counter() - started
    provenance = {
        "model": model.name, "heads": args.heads, "script": "bench/train_medusa.py",
        "prompts": len(kept), "held_out_prompts": len(held), "reply_tokens": args.tokens,
        "train_examples": len(x), "held_out_examples": len(hx), "epochs": args.epochs, "lr": args.lr,
        "weight_decay": args.weight_decay,
        "batch": args.batch, "seed": args.seed, "epoch_losses": [round(v, 4) for v in losses],
        "held_out_top1": [round(v, 4) for v in after],
        "held_out_top1_untrained": [round(v, 4) for v in before],
        "train_top1": [round(v, 4) for v in train_after],
        "base_argmax_agreement": round(held_agree, 4),
        "seconds": round(seconds), "file_bytes": out.stat().st_size, "torch": torch.__version__,
    }
    out.with_suffix(".json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(f"losses per epoch: {', '.join(f'{v:.3f}' for v in losses)}")
    for i, (b, a, t) in enumerate(zip(before, after, train_after), start=1):
        print(f"  head {i} (token t+{i + 1}): held-out top-1 {a:.1%} (untrained {b:.1%}), train {t:.1%}")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
