"""`PrefixCache`: reuse the KV cache of a prompt's prefix across runs (prefix sharing, as in SGLang's RadixAttention).

    prefixes = wb.PrefixCache()
    first = wb.generate(model, chat, prefixes=prefixes)                 # a full prefill; keeps a snapshot at the end
    chat += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And then?"}]
    second = wb.generate(model, chat, prefixes=prefixes)                # feeds only what follows the shared prefix
    second.config["prefix_reused"]                                      # tokens whose prefill was skipped

A trie over token ids holds session snapshots (`Session.fork()`: the cache, positions and policy state) taken
at the end of each run: its prompt and generated tokens, all of them fed (the last token chosen never is). A new
run walks the trie along its prompt and starts from the deepest snapshot that is a prefix of it, feeding only the
rest as an "append" pass (the phase of a later chat turn), and gives the tokens a full prefill would have given.
A cache that keeps every token and never acts on attention (`full`) can also start from a deeper snapshot cut
back to the shared prefix (`KVCache.crop`), as RadixAttention reuses any shared prefix of a stored sequence: two
questions after one long system prompt share its prefill.

Each configuration (model, attention variant, cache policy with its parameters, router) has its own trie: a
snapshot is only reused by the components that made it. A compressing policy's snapshot holds what the policy
kept of the prefix when it was stored (with the first run's prompt in view), so its reuse is what a multi-turn
conversation over one cache would give, not a fresh prefill. At least the prompt's last token is always fed (its
logits choose the first token). The least recently used snapshots go beyond `capacity`.

What it does not do: share memory between snapshots (each is a copy, unlike RadixAttention's paged KV), reuse a
prefix across different configurations, or record the reused prefix's prompt rows in the trace (the run's first
pass is then an append of the rest).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from workbench.errors import ParameterError


@dataclass(eq=False)
class _Node:
    depth: int
    parent: _Node | None = None
    token: int | None = None
    children: dict[int, _Node] = field(default_factory=dict)
    snapshot: object = None  # a Session fork at this prefix, or None


@dataclass
class Reuse:
    """A lookup's result: the session to continue (a fork of a snapshot) and how many prompt tokens it holds."""

    session: object
    tokens: int


class PrefixCache:
    """Session snapshots by token prefix, per configuration (see the module docstring)."""

    def __init__(self, capacity: int = 8):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ParameterError(f"PrefixCache capacity is the number of snapshots kept, an integer >= 1; "
                                 f"got {capacity!r}")
        self.capacity = capacity
        self._roots: dict[tuple, _Node] = {}
        self._recent: OrderedDict[int, tuple[tuple, _Node]] = OrderedDict()  # id(node) -> (key, node), LRU first
        self.hits = self.misses = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._recent)

    def __repr__(self) -> str:
        return (f"PrefixCache({len(self)} snapshots of {self.capacity}, {self.hits} hits, {self.misses} misses, "
                f"{self.reused_tokens} prompt tokens reused)")

    @staticmethod
    def key(session) -> tuple:
        """What a snapshot must share with a run to be reused by it."""
        return (id(session.model.hf), repr(session.attention), repr(session.policy), repr(session.router))

    # -- lookup -----------------------------------------------------------------------------------------------
    def reuse(self, session, prompt: list[int], observer=None) -> Reuse | None:
        """The longest reusable prefix of `prompt` (at most all but its last token) for a run configured like
        `session` (a fresh one, nothing fed): a fork of the snapshot, cut back to the shared prefix where the
        cache allows, with `observer` bound; None when nothing is shared."""
        root = self._roots.get(self.key(session))
        if root is None:
            self.misses += 1
            return None
        node, best = root, None  # node: the deepest point of the prompt's path in the trie
        for token in prompt[:-1]:
            child = node.children.get(token)
            if child is None:
                break
            node = child
            if node.snapshot is not None:
                best = node
        depth = node.depth
        if depth and (best is None or best.depth < depth) and not session.policy.needs_bridge:
            deeper = _any_snapshot_below(node)  # a full cache can be cut back to the shared prefix
            if deeper is not None:
                return self._hit(deeper, depth, observer)
        if best is None:
            self.misses += 1
            return None
        return self._hit(best, best.depth, observer)

    def _hit(self, node: _Node, tokens: int, observer) -> Reuse:
        fork = node.snapshot.fork(observer=observer)
        if tokens < node.depth:
            fork.cache.crop(tokens)
        self._recent.move_to_end(id(node))
        self.hits += 1
        self.reused_tokens += tokens
        return Reuse(fork, tokens)

    # -- storing ----------------------------------------------------------------------------------------------
    def store(self, session, tokens: list[int]) -> None:
        """Keep a snapshot of `session`, which has fed exactly `tokens` (committed), under that prefix."""
        if session.position != len(tokens) or session.committed != session.position or not tokens:
            return  # an open tail, or a session that fed something else: nothing to keep
        node = self._roots.setdefault(self.key(session), _Node(0))
        for token in tokens:
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = _Node(node.depth + 1, node, token)
            node = child
        node.snapshot = session.fork()
        self._recent[id(node)] = (self.key(session), node)
        self._recent.move_to_end(id(node))
        while len(self._recent) > self.capacity:
            _, (_, oldest) = self._recent.popitem(last=False)
            oldest.snapshot = None
            _prune(oldest)


def _any_snapshot_below(node: _Node) -> _Node | None:
    """The shallowest snapshot in the subtree of `node` (itself included)."""
    level = [node]
    while level:
        for candidate in level:
            if candidate.snapshot is not None:
                return candidate
        level = [child for candidate in level for child in candidate.children.values()]
    return None


def _prune(node: _Node) -> None:
    """Remove nodes that hold no snapshot and lead to none."""
    while node.parent is not None and node.snapshot is None and not node.children:
        del node.parent.children[node.token]
        node = node.parent
