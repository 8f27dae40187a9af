"""Learn AdaDec's entropy threshold for a model (default: the embedded SmolLM2-135M-Instruct on CPU).

As in the paper (He et al., arXiv 2506.08980) and its code (src/learn_threshold/): HumanEval-style prompts (a
signature and a docstring) are followed by a reference solution, teacher-forced through the model (here one forward
pass over prompt + solution, no cache); for every reference token we record the entropy of the model's next-token
distribution and whether the reference token is its argmax, then fit a class-balanced logistic regression of the
second on the first (workbench.decode.adadec_threshold). The threshold printed first is the entropy where the fit
crosses 0.5, the one `adadec` uses by default; the authors' variant (fit on a balanced 80% split, cutoff tuned for
accuracy on the other 20%) is printed after it for comparison. The 16 tasks and solutions below were written for
this script (none is taken from a benchmark).

    .venv/bin/python bench/adadec_threshold.py                # embedded model, CPU, about a minute
    .venv/bin/python bench/adadec_threshold.py --model HF_ID --device cuda --json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import workbench as wb
from workbench.decode.adadec_threshold import accuracy_cutoff, fit_logistic, learn_threshold
from workbench.kernels import softmax_entropy

TASKS = [
    ('def add(a, b):\n    """Return the sum of a and b."""\n',
     "    return a + b\n"),
    ('def is_even(n):\n    """Return True if the integer n is even, else False."""\n',
     "    return n % 2 == 0\n"),
    ('def reverse_string(s):\n    """Return the string s reversed."""\n',
     "    return s[::-1]\n"),
    ('def factorial(n):\n    """Return n! for a non-negative integer n."""\n',
     "    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result\n"),
    ('def count_vowels(text):\n    """Count the vowels (a, e, i, o, u, either case) in text."""\n',
     '    return sum(1 for ch in text.lower() if ch in "aeiou")\n'),
    ('def max_of_list(values):\n    """Return the largest number in a non-empty list, without using max()."""\n',
     "    best = values[0]\n    for v in values[1:]:\n        if v > best:\n            best = v\n    return best\n"),
    ('def is_palindrome(s):\n    """Return True if s reads the same forwards and backwards, ignoring case."""\n',
     "    s = s.lower()\n    return s == s[::-1]\n"),
    ('def fibonacci(n):\n    """Return the n-th Fibonacci number, with fibonacci(0) == 0 and fibonacci(1) == 1."""\n',
     "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"),
    ('def unique_sorted(items):\n    """Return the distinct elements of items in increasing order."""\n',
     "    return sorted(set(items))\n"),
    ('def word_count(sentence):\n    """Return a dict mapping each word of sentence (split on whitespace) to '
     'how often it occurs."""\n',
     "    counts = {}\n    for word in sentence.split():\n        counts[word] = counts.get(word, 0) + 1\n"
     "    return counts\n"),
    ('def gcd(a, b):\n    """Return the greatest common divisor of two positive integers."""\n',
     "    while b:\n        a, b = b, a % b\n    return a\n"),
    ('def is_prime(n):\n    """Return True if n is a prime number."""\n',
     "    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n        if n % i == 0:\n"
     "            return False\n        i += 1\n    return True\n"),
    ('def flatten(nested):\n    """Flatten a list of lists into one list, keeping the order."""\n',
     "    return [x for sub in nested for x in sub]\n"),
    ('def celsius_to_fahrenheit(c):\n    """Convert a temperature from degrees Celsius to degrees Fahrenheit."""\n',
     "    return c * 9 / 5 + 32\n"),
    ('def running_sum(numbers):\n    """Return the list of prefix sums of numbers: [1, 2, 3] -> [1, 3, 6]."""\n',
     "    total = 0\n    out = []\n    for x in numbers:\n        total += x\n        out.append(total)\n"
     "    return out\n"),
    ('def char_frequency(s):\n    """Return the character of s that occurs most often (the first one on ties)."""\n',
     "    best, best_count = None, 0\n    for ch in s:\n        c = s.count(ch)\n        if c > best_count:\n"
     "            best, best_count = ch, c\n    return best\n"),
]


def token_statistics(model, tasks) -> tuple[np.ndarray, np.ndarray]:
    """(entropy, ranked_first) for every reference token of every task, teacher-forced through the model."""
    entropies, first = [], []
    for prompt, solution in tasks:
        # tokenised apart, as the authors do, so the solution's tokens do not merge with the prompt's last ones
        prompt_ids = model.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        solution_ids = model.tokenizer(solution, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt_ids + solution_ids], device=model.device)
        with torch.inference_mode():
            logits = model.hf(input_ids=ids).logits[0].float()
        rows = logits[len(prompt_ids) - 1:-1]  # row i predicts solution token i
        target = torch.tensor(solution_ids, device=rows.device)
        entropies.append(softmax_entropy(rows)[1].cpu().numpy())
        first.append((rows.argmax(-1) == target).cpu().numpy())
    return np.concatenate(entropies).astype(np.float64), np.concatenate(first)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC: the chance a positive scores above a negative (ties count half), over all pairs."""
    pos, neg = scores[labels.astype(bool)], scores[~labels.astype(bool)]
    greater = (pos[:, None] > neg[None, :]).mean()
    return float(greater + 0.5 * (pos[:, None] == neg[None, :]).mean())


def authors_variant(entropy, first, seed: int = 42) -> dict:
    """The authors' rule: a random 80/20 split, a fit on the balanced 80%, the accuracy-best cutoff on the 20%."""
    order = np.random.default_rng(seed).permutation(len(entropy))
    test, train = order[:len(order) // 5], order[len(order) // 5:]
    a, w = fit_logistic(entropy[train], first[train], balance=True)
    p_test = 1 / (1 + np.exp(-(a + w * entropy[test])))
    cutoff, accuracy = accuracy_cutoff(p_test, first[test])
    at_half = float(((p_test >= 0.5) == first[test]).mean())
    return {"cutoff": cutoff, "test_accuracy": accuracy, "test_accuracy_at_0.5": at_half,
            "threshold": learn_threshold(entropy[train], first[train], cutoff=cutoff)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model to load (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON object")
    args = parser.parse_args()
    torch.set_num_threads(2)  # the shared machine's cores

    started = time.perf_counter()
    model = wb.load(args.model, device=args.device, dtype="float32" if args.device == "cpu" else None)
    entropy, first = token_statistics(model, TASKS)
    intercept, slope = fit_logistic(entropy, first, balance=True)
    threshold = learn_threshold(entropy, first)
    p = 1 / (1 + np.exp(-(intercept + slope * entropy)))
    result = {
        "model": model.name, "tasks": len(TASKS), "tokens": int(len(entropy)), "ranked_first": int(first.sum()),
        "not_first": int((~first).sum()), "entropy_mean_first": float(entropy[first].mean()),
        "entropy_mean_not_first": float(entropy[~first].mean()), "intercept": intercept, "slope": slope,
        "threshold": threshold, "accuracy_at_0.5": float(((p >= 0.5) == first).mean()), "auc": auc(-entropy, first),
        "lookahead_share": float((entropy >= threshold).mean()),
        "authors_variant": authors_variant(entropy, first),
        "seconds": time.perf_counter() - started,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['model']}: {result['tokens']} reference tokens from {result['tasks']} tasks, "
          f"{result['ranked_first']} ranked first, {result['not_first']} not")
    print(f"mean entropy (nats): {result['entropy_mean_first']:.4f} where the reference ranked first, "
          f"{result['entropy_mean_not_first']:.4f} where it did not")
    print(f"balanced fit: P(first | H) = sigmoid({intercept:.4f} {slope:+.4f} * H); AUC {result['auc']:.4f}, "
          f"accuracy at 0.5 {result['accuracy_at_0.5']:.4f}")
    print(f"threshold (P = 0.5): {threshold:.6f} nats; {result['lookahead_share']:.1%} of these tokens would look "
          "ahead")
    v = result["authors_variant"]
    print(f"authors' variant (80/20 split, seed 42): cutoff {v['cutoff']:.2f} (test accuracy {v['test_accuracy']:.4f}, "
          f"{v['test_accuracy_at_0.5']:.4f} at 0.5) -> threshold {v['threshold']:.6f} nats")
    print(f"{result['seconds']:.1f} s")


if __name__ == "__main__":
    main()
