"""`medusa`: extra decoding heads on the target's last hidden state draft the next tokens; one verify pass checks
them (Cai et al., 2024).

Medusa puts K small heads on the base model. At the last fed position t, with h_t the final layer's hidden state
(after the final norm), the model's own LM head predicts token t+1 and head i (1..K) predicts token t+1+i:

    head_i(h) = LMHead(h + SiLU(W_i h + b_i))                 (one residual block per head: Medusa's ResBlock)

Here the pending token is the base model's t+1 (chosen from the last pass's logits): the root of the candidates.
Tree verification (the default, `tree="default"`, or a list in Medusa's `medusa_choices` format; see
workbench.decode.tree): node (a, b) is head 1's a-th candidate followed by head 2's b-th; the root and every node
go through ONE verify pass in which each token sits at the root's position plus its depth and attends only to its
ancestors (a tree attention mask); the path that keeps the most nodes is committed (the cache keeps that path's
keys and values and drops the other branches) and the hidden state at its last node drafts the next tree.
`tree="chain"`: the draft is each head's top-1, verified as one sequence (the step every drafter shares,
workbench.decode.speculative). A session that cannot verify a tree (a sparse attention variant, or a cache policy
that acts on provisional rows one at a time, e.g. h2o) verifies the chain instead. h_t costs no extra pass: the
decoder asks the verify and plain decode passes for their hidden states and keeps the one at the last committed
position.

Acceptance. `greedy=True` (Medusa's temperature 0): a draft token is kept while it is the target's argmax, so the
tokens equal plain greedy decoding's (lossless). `greedy=False`: Medusa's typical acceptance (lossy), at
`sample`'s temperature and filters: draft token x is kept while

    p(x) > min(epsilon, alpha * exp(-H(p)))                  (paper: epsilon = 0.09, alpha = sqrt(epsilon) = 0.3)

with p the distribution at its parent; among the paths that keep the most nodes the one with the highest summed
log p wins (the reference's evaluate_posterior). The token after the kept path is drawn from p with the tokens
under that threshold removed (the reference's `get_typical_one_token`); plain steps draw from the same truncated
p.

Heads. `MedusaHeads` holds only the residual blocks; every head ends in the base model's own LM head (SmolLM2 ties
it to the embeddings), so the shipped file is a few MB. `load_heads(model)` finds the heads trained for the model
(workbench/models/medusa/<model name>.pt, written by bench/train_medusa.py: self-distillation on the model's own
greedy replies).
"""

from __future__ import annotations

import ast
import copy
import functools
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.decode.sample import Sample
from workbench.decode.speculative import Drafting, elapsed, record_verify
from workbench.decode.tree import DEFAULT_CHOICES, CandidateTree, best_path
from workbench.errors import ParameterError
from workbench.registry import param

HEADS_DIR = Path(__file__).resolve().parent.parent / "models" / "medusa"  # shipped heads, one file per model


class MedusaHeads(torch.nn.Module):
    """K Medusa heads without their LM head: head i maps the last hidden state h to h + SiLU(W_i h + b_i), which
    the base model's LM head turns into logits for the token i + 1 positions after the next one. W_i starts at
    zero (as in the reference), so an untrained head predicts what the LM head predicts."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(hidden_size, hidden_size) for _ in range(num_heads))
        for block in self.blocks:
            torch.nn.init.zeros_(block.weight)
            torch.nn.init.zeros_(block.bias)

    @property
    def num_heads(self) -> int:
        return len(self.blocks)

    @property
    def hidden_size(self) -> int:
        return self.blocks[0].in_features

    def residual(self, hidden: torch.Tensor, heads: int | None = None) -> torch.Tensor:
        """(heads, ..., hidden): each head's residual block applied to `hidden` (..., hidden)."""
        blocks = self.blocks[:heads] if heads is not None else self.blocks
        return torch.stack([hidden + torch.nn.functional.silu(block(hidden)) for block in blocks])

    def forward(self, hidden: torch.Tensor, lm_head: torch.nn.Module, heads: int | None = None) -> torch.Tensor:
        """(heads, ..., vocab) logits of the first `heads` heads (all by default) at hidden states (..., hidden)."""
        return lm_head(self.residual(hidden, heads))

    def save(self, path: str | Path, model_name: str) -> None:
        """Write the heads in float16 (the format `read_heads` loads)."""
        state = {name: tensor.detach().to("cpu", torch.float16) for name, tensor in self.state_dict().items()}
        torch.save({"model": model_name, "hidden_size": self.hidden_size, "num_heads": self.num_heads,
                    "state_dict": state}, path)


def heads_path(model_name: str) -> Path:
    """Where the heads shipped for `model_name` live (a hub id's "/" becomes "--")."""
    return HEADS_DIR / (re.sub(r"[^A-Za-z0-9._-]", "--", model_name) + ".pt")


def read_heads(path: str | Path) -> MedusaHeads:
    """The heads saved at `path` (float32, on the CPU)."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    heads = MedusaHeads(saved["hidden_size"], saved["num_heads"])
    heads.load_state_dict({name: tensor.float() for name, tensor in saved["state_dict"].items()})
    return heads.eval().requires_grad_(False)


def load_heads(model) -> MedusaHeads:
    """The Medusa heads shipped for `model` (found by its name), on the CPU in float32."""
    path = heads_path(model.name)
    if not path.is_file():
        raise ParameterError(f"medusa has no heads for model {model.name}; train them with bench/train_medusa.py "
                             f"(shipped: {', '.join(sorted(p.stem for p in HEADS_DIR.glob('*.pt'))) or 'none'})")
    return _read_cached(str(path))


@functools.lru_cache(maxsize=4)
def _read_cached(path: str) -> MedusaHeads:
    return read_heads(path)


@dataclass
class Medusa(Drafting):
    name = "medusa"
    summary = ("Medusa: K heads on the last hidden state propose a tree of candidates, one verify pass with a tree "
               "attention mask checks them all.")
    paper = ("Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads (Cai, Li, Geng, "
             "Peng, Lee, Chen, Dao; ICML 2024)")
    departs = ("the default tree is a 15-node sparse tree sized for a CPU (the paper's are calibrated per model, "
               "up to 63 nodes on a GPU); a session whose attention is sparse or whose cache acts on provisional "
               "rows verifies the chain of top-1s instead; every head reuses the base model's LM head (Medusa trains one LM head per head); the shipped heads "
               "are trained briefly on CPU by self-distillation on a few dozen of the model's own greedy replies "
               "(bench/train_medusa.py), hard labels, base model frozen (Medusa-1), not on ShareGPT; typical mode "
               "draws the token after the kept prefix from the thresholded p (the reference's get_typical_one_token) and "
               "takes the exact entropy (the reference adds 1e-5 inside the log)")

    lossless = True  # in the default greedy mode; greedy=False (typical acceptance) is lossy

    k: int = param(4, "heads used: draft tokens per verify pass (at most the heads shipped)", min=1)
    greedy: bool = param(True, "accept on argmax equality (tokens equal greedy decoding); False: Medusa's typical "
                               "acceptance at `temperature` (lossy)")
    epsilon: float = param(0.09, "typical acceptance: hard probability threshold (the paper's 0.09)",
                           min=0.0, max=1.0)
    alpha: float = param(0.3, "typical acceptance: entropy-scaled threshold alpha * exp(-H) (the paper's "
                              "sqrt(epsilon) = 0.3)", min=0.0, max=1.0)
    heads: Any = param(None, "the Medusa heads: None (those shipped for the model), a .pt path written by "
                             "bench/train_medusa.py, or a MedusaHeads object")
    tree: Any = param("default", "candidates per verify pass: 'default' (a 15-node sparse tree), 'chain' (each "
                                 "head's top-1, a linear pass), or a list of tuples in Medusa's medusa_choices "
                                 "format, e.g. [(0,), (1,), (0, 0)]; nodes deeper than k are left out")

    def validate(self) -> None:
        super().validate()
        if self.heads is not None and not isinstance(self.heads, (str, Path, MedusaHeads)):
            raise ParameterError(f"decoder 'medusa' parameter 'heads' is a {type(self.heads).__name__}; give None "
                                 "(the heads shipped for the model), a .pt path or a MedusaHeads object")
        if isinstance(self.heads, MedusaHeads):
            self._check_k(self.heads, "the given heads")
        self.choices()  # a bad tree is refused here, with the node at fault

    def _check_k(self, heads: MedusaHeads, what: str) -> None:
        if self.k > heads.num_heads:
            raise ParameterError(f"decoder 'medusa' parameter 'k' is {self.k}; {what} have {heads.num_heads} "
                                 f"heads, so k must be in 1..{heads.num_heads}")

    # -- the heads ----------------------------------------------------------------------------------------------
    def run_heads(self, ctx) -> MedusaHeads:
        """This run's heads, on the model's device and in its dtype (resolved once per run)."""
        heads = ctx.state.get("medusa_heads")
        if heads is None:
            model = ctx.session.model
            if isinstance(self.heads, MedusaHeads):
                heads, what = self.heads, "the given heads"
            elif self.heads is not None:
                if not Path(self.heads).is_file():
                    raise ParameterError(f"decoder 'medusa' parameter 'heads': no file at {str(self.heads)!r}; "
                                         "give a .pt written by bench/train_medusa.py, or None")
                heads, what = _read_cached(str(self.heads)), f"the heads at {self.heads}"
            else:
                heads, what = load_heads(model), f"the heads shipped for {model.name}"
            hidden_size = model.text_config.hidden_size
            if heads.hidden_size != hidden_size:
                raise ParameterError(f"decoder 'medusa': {what} take hidden size {heads.hidden_size}, model "
                                     f"{model.name} has {hidden_size}")
            self._check_k(heads, what)
            first = next(heads.parameters())
            if first.device != model.device or first.dtype != model.dtype:  # a copy: the given object stays as is
                heads = copy.deepcopy(heads).to(model.device, model.dtype)
            heads = ctx.state["medusa_heads"] = heads
        return heads

    # -- the hidden state at the last committed position -------------------------------------------------------
    def plain_step(self, ctx) -> list[int]:
        pending = ctx.take_pending()
        if pending:  # fed here, not by ctx.logits, to keep the pass's hidden state for the next draft
            logits, hidden = ctx.session.feed(pending, "decode", hidden=True)
            ctx.chose_from(logits[-1])
            ctx.state["medusa_hidden"] = hidden[-1][-1]
        return super().plain_step(ctx)

    def verify(self, ctx, ids: list[int]) -> torch.Tensor:
        rows, hidden = ctx.session.feed(ids, "verify", hidden=True)
        ctx.state["medusa_verify_hidden"] = hidden[-1]
        return rows

    # -- tree verification --------------------------------------------------------------------------------------
    def choices(self) -> tuple[tuple[int, ...], ...] | None:
        """The tree's nodes in Medusa's format (None: verify the chain); a string such as "[(0,), (1,), (0, 0)]"
        (from the CLI or the panel) is read as that list."""
        if self.tree in ("default", "chain"):
            return DEFAULT_CHOICES if self.tree == "default" else None
        tree = self.tree
        if isinstance(tree, str):
            try:
                tree = ast.literal_eval(tree)
            except (ValueError, SyntaxError):
                raise ParameterError(f"decoder 'medusa' parameter 'tree' is {self.tree!r}; give 'default', 'chain' "
                                     "or a list of tuples like [(0,), (1,), (0, 0)]") from None
        return CandidateTree.of(tree).choices

    def candidate_tree(self, depth: int) -> CandidateTree | None:
        """The tree to verify with at most `depth` levels (None: verify the chain)."""
        choices = self.choices()
        return None if choices is None else _tree(choices, min(depth, self.k))

    def speculate(self, ctx, pending: list[int]) -> list[int]:
        hidden = ctx.state.get("medusa_hidden")
        tree = self.candidate_tree(self.length(ctx))
        if tree is None or hidden is None or not ctx.session.takes_tree:
            return super().speculate(ctx, pending)
        device = ctx.session.model.device
        started = time.perf_counter()
        heads = self.run_heads(ctx)
        with torch.inference_mode():
            logits = heads(hidden, ctx.session.model.hf.get_output_embeddings(), tree.depth)  # (depth, vocab)
        top = logits.topk(tree.widest(), dim=-1).indices.tolist()
        tokens = [top[head][rank] for head, rank in tree.ranks()]
        drafting = elapsed(started, device)
        started = time.perf_counter()
        rows, states = ctx.session.feed(pending + tokens, "verify", hidden=True, tree=tree)
        verifying = elapsed(started, device)
        ctx.chose_from(rows[0])
        path, target = self.judge(tree, rows, tokens)
        last = path[-1] if path else 0
        after = int(rows[last].argmax()) if self.greedy else int(torch.multinomial(target[last], 1,
                                                                                   generator=ctx.rng))
        started = time.perf_counter()
        ctx.session.commit(1 + len(path), rows=[0] + path)
        ctx.state["medusa_hidden"] = states[-1][last]
        committing = elapsed(started, device)
        self._schedule(ctx, tree.depth, len(path), drafting, verifying)
        out = [tokens[row - 1] for row in path] + [after]
        if ctx.recording("verify_drafted"):
            target = self.probabilities(rows) if target is None else target
            record_verify(ctx, out, tree.depth, len(path), target[[0] + path], None, drafting, committing,
                          candidates=tree.size)
        return out

    def judge(self, tree: CandidateTree, rows: torch.Tensor, tokens: list[int]):
        """(the kept path's rows, the target's probabilities or None): each node is tested against the
        distribution at its parent's row, greedy (the argmax) or typical (above the threshold)."""
        parents = torch.tensor(tree.parents, device=rows.device)
        candidates = torch.tensor(tokens, device=rows.device)
        accepted = torch.zeros(tree.size + 1, dtype=torch.bool, device=rows.device)
        if self.greedy:
            accepted[1:] = rows.argmax(-1)[parents] == candidates
            return best_path(tree, accepted), None
        probs = torch.softmax(Sample.truncate(self, rows.float() / self.temperature), dim=-1)
        p = probs[parents, candidates]
        accepted[1:] = p > self.threshold(probs)[parents]
        score = torch.zeros(tree.size + 1, device=rows.device)
        score[1:] = torch.log(p.clamp_min(1e-30))
        return best_path(tree, accepted, score), self.probabilities(rows)

    def accepted(self, ctx, kept: int) -> None:
        # the pending token and `kept` draft tokens were committed: the last of them chose the next pending token
        ctx.state["medusa_hidden"] = ctx.state.pop("medusa_verify_hidden")[kept]

    def draft(self, ctx, pending: list[int]) -> tuple[list[int], torch.Tensor | None]:
        hidden = ctx.state.get("medusa_hidden")
        if hidden is None:
            return [], None
        heads = self.run_heads(ctx)
        n = min(self.length(ctx), self.k)
        with torch.inference_mode():
            logits = heads(hidden, ctx.session.model.hf.get_output_embeddings(), n)  # (n, vocab)
        return logits.argmax(-1).tolist(), None  # the chain of top-1s: a deterministic draft

    # -- typical acceptance -------------------------------------------------------------------------------------
    def threshold(self, probs: torch.Tensor) -> torch.Tensor:
        """(rows,) Medusa's typical threshold min(epsilon, alpha * exp(-H(p))) of each row of probabilities."""
        entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)  # 0 log 0 = 0
        return torch.clamp(self.alpha * torch.exp(-entropy), max=self.epsilon)

    def truncate(self, logits: torch.Tensor) -> torch.Tensor:
        logits = super().truncate(logits)
        if self.greedy:
            return logits
        probs = torch.softmax(logits, dim=-1)
        return logits.masked_fill(probs < self.threshold(probs)[..., None], -math.inf)  # the argmax always stays

    def keep(self, ctx, rows, target, tokens, draft_probs) -> tuple[int, int]:
        if self.greedy:
            return super().keep(ctx, rows, target, tokens, draft_probs)
        # p at the temperature, after sample's filters and before the typical threshold
        probs = torch.softmax(Sample.truncate(self, rows.float() / self.temperature), dim=-1)
        plausible = probs[torch.arange(len(tokens)), tokens] > self.threshold(probs[:len(tokens)])
        kept = int(plausible.long().cumprod(0).sum())
        return kept, int(torch.multinomial(target[kept], 1, generator=ctx.rng))  # target: truncated p


@functools.lru_cache(maxsize=16)
def _tree(choices: tuple[tuple[int, ...], ...], depth: int) -> CandidateTree:
    return CandidateTree.of([c for c in choices if len(c) <= depth], depth)
