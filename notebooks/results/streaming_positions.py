"""StreamingLLM past the model's context length: where cached keys sit (their positions in the text, or their
places inside the cache) decides whether the model still predicts well. Writes streaming_positions.nc, which
notebook 02 plots.

The text is datasets/harbor_town.txt repeated to `--tokens` tokens (past SmolLM2-135M's 8192 positions); it is fed
`--chunk` tokens per forward pass through a session, and -log p of every token is kept. Configurations: the full
cache, and streaming_llm at `--budget` with positions="cache" (the paper) and positions="original".

    .venv/bin/python notebooks/results/streaming_positions.py          # ~12k tokens, about 15 minutes on 2 cores
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from tqdm import tqdm

import workbench as wb

HERE = Path(__file__).resolve().parent
TEXT = HERE.parents[1] / "datasets" / "harbor_town.txt"


def token_nll(model, ids: list[int], cache, chunk: int) -> np.ndarray:
    """-log p of ids[1:] given everything before, fed `chunk` tokens per pass (the first pass is the prefill)."""
    session = wb.Session(model, cache)
    nll, phase = [], "prefill"
    for start in tqdm(range(0, len(ids) - 1, chunk), desc=str(cache), leave=False):
        piece = ids[start:start + chunk]
        logits = session.feed(piece, phase, logits="all")
        targets = torch.tensor(ids[start + 1:start + 1 + len(piece)])
        scored = torch.log_softmax(logits[:len(targets)], -1).gather(1, targets[:, None])[:, 0]
        nll.append(-scored.numpy())
        phase = "append"
    return np.concatenate(nll)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=12288)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--out", default=str(HERE / "streaming_positions.nc"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = wb.load(device="cpu", dtype="float32")
    once = model.tokenizer(TEXT.read_text(), add_special_tokens=False)["input_ids"]
    ids = (once * (args.tokens // len(once) + 1))[:args.tokens]
    caches = {"full": "full",
              "streaming_llm, positions in the cache": wb.cache.get("streaming_llm", budget=args.budget),
              "streaming_llm, original positions": wb.cache.get("streaming_llm", budget=args.budget,
                                                                positions="original")}
    nll = np.stack([token_nll(model, ids, cache, args.chunk) for cache in caches.values()])
    ds = xr.Dataset({"nll": (("cache", "position"), nll)},
                    coords={"cache": list(caches), "position": np.arange(1, len(ids))},
                    attrs={"model": model.name, "context_length": int(model.max_positions or 0),
                           "budget": args.budget, "chunk": args.chunk, "text": TEXT.name,
                           "command": "python notebooks/results/streaming_positions.py"})
    ds["nll"].attrs.update(description="-log p of the token at this position given the text before it", units="nats")
    ds.to_netcdf(args.out)
    print(ds.nll.coarsen(position=1024, boundary="trim").mean().to_pandas().T.round(3))


if __name__ == "__main__":
    main()
