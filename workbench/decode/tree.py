"""Candidate trees for tree verification (Medusa's sparse trees; SpecInfer's token trees).

A tree is given as Medusa's `medusa_choices`: a list of tuples, each a node. Node (a, b, c) is the path "head 1's
candidate a, then head 2's candidate b, then head 3's candidate c": its depth is its length, its token is the c-th
candidate of the head at that depth, and its parent is (a, b). The root is the pending token (depth 0), which
the base model chose. Every node's parent must be in the tree.

`CandidateTree` turns the choices into what a verify pass needs: the nodes in breadth-first order (a parent
always before its children, so the pass's causal order holds), each node's parent and depth, the ancestor mask
(node i may attend to node j when j is i or one of its ancestors), and the root-to-leaf paths the acceptance rule
compares.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from workbench.errors import ParameterError

# A small sparse tree for a 4-head Medusa on a CPU (15 candidates, a 16-token verify pass): wide where the first
# heads are, a chain of top-1s to the last head. Medusa's own trees (e.g. mc_sim_7b_63, 63 nodes) are sized for
# GPUs, where a 64-token pass costs about what one token does.
DEFAULT_CHOICES = ((0,), (1,), (2,), (3,), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0),
                   (0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, 0, 0))


@dataclass(frozen=True)
class CandidateTree:
    choices: tuple[tuple[int, ...], ...]  # the nodes, breadth-first (by depth, then by the choices)

    @classmethod
    def of(cls, choices, heads: int | None = None) -> CandidateTree:
        """The tree of `choices` (a list of tuples of candidate ranks, Medusa's format) for `heads` heads (None:
        any depth)."""
        try:
            nodes = sorted({tuple(int(r) for r in choice) for choice in choices}, key=lambda c: (len(c), c))
        except (TypeError, ValueError):
            raise ParameterError(f"a candidate tree is a list of tuples of candidate ranks like [(0,), (1,), (0, 0)]; "
                                 f"got {choices!r}") from None
        if not nodes:
            raise ParameterError("a candidate tree needs at least one node, e.g. [(0,)]")
        present = set(nodes)
        for node in nodes:
            if not node or min(node) < 0:
                raise ParameterError(f"tree node {node} must be a non-empty tuple of ranks >= 0")
            if heads is not None and len(node) > heads:
                raise ParameterError(f"tree node {node} is {len(node)} deep; the heads give {heads} levels")
            if len(node) > 1 and node[:-1] not in present:
                raise ParameterError(f"tree node {node} has no parent {node[:-1]} in the tree")
        return cls(tuple(nodes))

    @property
    def size(self) -> int:
        """Candidate nodes (the root, the pending token, not counted)."""
        return len(self.choices)

    @property
    def depth(self) -> int:
        """The most draft tokens one pass can accept."""
        return max(len(c) for c in self.choices)

    @cached_property
    def parents(self) -> list[int]:
        """Per node, its parent's row in the verify pass (row 0 is the root, node i is row i + 1)."""
        row = {c: i + 1 for i, c in enumerate(self.choices)}
        return [row.get(c[:-1], 0) for c in self.choices]

    @cached_property
    def depths(self) -> list[int]:
        """Per row of the verify pass (the root first), its depth: its position is the root's plus this."""
        return [0] + [len(c) for c in self.choices]

    def ancestors(self, device=None) -> torch.Tensor:
        """Bool (rows, rows): row i may attend to row j (j is i or an ancestor of i); rows = size + 1."""
        rows = self.size + 1
        mask = torch.eye(rows, dtype=torch.bool)
        for i, parent in enumerate(self.parents, start=1):
            mask[i] |= mask[parent]
        return mask.to(device)

    @cached_property
    def paths(self) -> list[list[int]]:
        """The root-to-leaf paths, each as the verify-pass rows of its nodes (the root excluded), in tree order."""
        parents_of = set(self.parents)
        out = []
        for row in range(1, self.size + 1):
            if row in parents_of:
                continue  # not a leaf
            path = [row]
            while self.parents[path[-1] - 1] != 0:
                path.append(self.parents[path[-1] - 1])
            out.append(path[::-1])
        return out

    def ranks(self) -> list[tuple[int, int]]:
        """Per node, (head, rank): the head at its depth and the rank of the candidate it takes."""
        return [(len(c) - 1, c[-1]) for c in self.choices]

    def widest(self) -> int:
        """The most candidates any head must give (top-k with k this)."""
        return 1 + max(c[-1] for c in self.choices)


def best_path(tree: CandidateTree, accepted: torch.Tensor, score: torch.Tensor | None = None) -> list[int]:
    """The rows of the path that keeps the most nodes (Medusa's evaluate_posterior): `accepted` bool (rows,) says
    whether each row's token passes the acceptance rule given its parent's distribution; a path keeps nodes up to
    its first rejected one. Ties go to the highest `score` (per row, e.g. log p; summed over the kept nodes),
    else to the first path. Returns the kept rows (possibly none)."""
    best, best_key = [], (0, float("-inf"))
    for path in tree.paths:
        kept = 0
        while kept < len(path) and bool(accepted[path[kept]]):
            kept += 1
        if kept == 0:
            continue
        total = float(score[path[:kept]].sum()) if score is not None else 0.0
        if (kept, total) > best_key:
            best, best_key = path[:kept], (kept, total)
    return best
