"""`Session`: one model binding, one cache, the positions; the only place a forward pass happens.

    with Session(model, cache=wb.cache.get("snapkv", budget=128), attention="flash") as session:
        logits = session.feed(prompt_ids, "prefill")[-1]      # (vocab,) float32 for the next token
        logits = session.feed([token], "decode")[-1]
        mark = session.mark()                                  # a position to come back to
        rows = session.feed(draft, "verify")                   # (len(draft), vocab): provisional
        session.commit(2)                                      # keep the first 2 draft tokens, drop the rest
        session.rollback(mark)                                 # or: back to exactly the state at `mark`

Phases (see workbench.attention.base.PHASES) travel with the pass to the attention variant and the cache policy.
Positions are the session's: every pass gets explicit position ids from `position`, so a cache that evicted
tokens still gives each new token its true RoPE position. The generation loop, the evaluation harness, the
prefill replay, the fidelity replay and the cache benchmark all feed through a Session.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch

from workbench import attention as attention_family
from workbench import cache as cache_family
from workbench import routers as router_family
from workbench.cache.kvcache import ForwardPass, KVCache
from workbench.errors import WorkbenchError
from workbench.run import bridge, layers, routing

LOGITS = ("last", "all", "none")


def build_cache(model, policy: Any = "full") -> KVCache:
    """A fresh cache of `policy` for `model`; policies that measure the model first (razor_attention's retrieval
    heads) run their forward passes through a session of their own (`probe`)."""
    return cache_family.get(policy).build(model, forward=probe(model))


def probe(model) -> Callable:
    """`forward(ids, observer, attention="eager")`: one prefill of `ids` through a fresh full-cache session whose
    attention statistics go to `observer` (what components that measure a model are handed)."""
    def forward(ids, observer, attention: Any = "eager") -> None:
        with Session(model, "full", attention, observer=observer) as session:
            session.feed(ids, "prefill", logits="none")

    return forward


class Session:
    """Feeds tokens into one model over one cache, with one attention variant, observer and router."""

    def __init__(self, model, cache: Any = "full", attention: Any = "sdpa", *, observer=None, router: Any = "native"):
        self.model = model
        self.policy = cache.policy if isinstance(cache, KVCache) else cache_family.get(cache)
        self.cache = cache if isinstance(cache, KVCache) else build_cache(model, self.policy)
        self.attention = attention_family.get(attention)
        self.router = router_family.get(router)
        if self.router.needs_moe and not routing.routers(model.hf):
            raise WorkbenchError(f"router '{self.router.name}' changes MoE routing, and {model.name} has no MoE "
                                 "routers (a dense model: use 'native', or wb.moefy(model) for an MoE version)")
        self.binding = bridge.Binding(self.attention, observer, self.cache)
        # the router bridge runs when there is something to do: a router that changes routing, or an observer of it
        self._routing_observer = observer if getattr(observer, "observes_routing", False) else None
        self._routes = self.router.needs_moe or self._routing_observer is not None
        self.router_state: dict = {}  # what the router keeps during the run (a simulated expert cache)
        self._layer_observer = observer if getattr(observer, "observes_layers", False) else None
        self.skip_layers: frozenset[int] = frozenset()  # decoder layers every pass skips (layer_skip's draft)
        self.peak_bytes = 0  # the most the cache held at any moment (a pass's uncompressed tokens included)
        self.held_peak_bytes = 0  # the most the cache held after any pass (once the policy compressed)
        self.listeners: list[Callable[[ForwardPass, float], None]] = []  # called after every pass
        self.forwards = 0
        self._keep_last = model.keep_logits(1)
        self._cache_keyword = model.cache_keyword

    def note_bytes(self) -> None:
        """Update the peaks from the cache: what it holds now and the most it held during the pass."""
        held = self.cache.nbytes()
        self.held_peak_bytes = max(self.held_peak_bytes, held)
        self.peak_bytes = max(self.peak_bytes, held, self.cache.peak_nbytes)

    def restart(self) -> None:
        """Start over with a fresh cache of the same policy (nothing fed)."""
        self.cache = build_cache(self.model, self.policy)
        self.binding.cache = self.cache

    def fork(self, observer=None) -> Session:
        """A new session that continues exactly as this one would: a copy of the cache (stores, positions, the
        policy's statistics and run state), the same model, attention variant and router; no listeners and no
        observer unless given one (what the fork feeds is not this session's record). The policy component is shared, not
        copied: components keep no run state. Needs no open provisional tail (commit or roll back first)."""
        if self.cache.tail_open:
            raise WorkbenchError(f"{self.position - self.committed} provisional tokens are open: commit(n) or "
                                 "rollback(mark) before fork()")
        with torch.inference_mode():  # the stores hold inference tensors
            cache = copy.deepcopy(self.cache, {id(self.cache.policy): self.cache.policy})
        fork = Session(self.model, cache, self.attention, observer=observer, router=self.router)
        fork.router_state = copy.deepcopy(self.router_state)
        fork.skip_layers = self.skip_layers
        fork.peak_bytes, fork.held_peak_bytes = self.peak_bytes, self.held_peak_bytes
        return fork

    # A session binds the model only for the duration of each forward, so it holds nothing to release: `with`
    # is accepted for readability and does nothing more.
    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        pass

    # -- positions --------------------------------------------------------------------------------------------
    @property
    def position(self) -> int:
        """The next token's position: every token fed so far (provisional ones included)."""
        return self.cache.position

    @property
    def committed(self) -> int:
        """Tokens fed and final (the provisional tail starts here)."""
        return self.cache.committed

    def mark(self) -> int:
        """A point to roll back to: the current position."""
        return self.position

    def rollback(self, mark: int) -> None:
        """Return the cache, the positions and the policy's statistics to exactly their state at `mark` (the last
        committed position or one inside the provisional tail). The router state (a simulated expert cache) is
        not rolled back: the passes did load those experts."""
        self.cache.rollback(mark)

    def commit(self, n: int, rows: list[int] | None = None) -> None:
        """After verify/rollout passes: keep the first `n` provisional tokens, drop the rest; the policy observes
        only the kept rows and evicts once. `rows`: keep these n provisional tokens instead (ascending offsets
        into the tail, 0 first): after a tree verify pass, the accepted path, renumbered to the next positions."""
        tail = self.position - self.committed
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= tail:
            raise WorkbenchError(f"commit takes how many of the {tail} provisional tokens to keep (0..{tail}); "
                                 f"got {n!r}")
        self.cache.commit(self.committed + n, rows)
        self.note_bytes()

    @property
    def takes_tree(self) -> bool:
        """Whether this session can run a tree verify pass: an attention variant that honours any mask and a cache
        policy that does not act on provisional rows (it would need them one at a time, in sequence)."""
        return self.attention.any_mask and not self.policy.acts_while_decoding

    # -- the forward pass -------------------------------------------------------------------------------------
    def feed(self, ids, phase: str, logits: str | None = None, hidden: bool = False, tree=None):
        """Run the tokens `ids` (a list, or a tensor (n,) / (1, n)) as one `phase` pass on top of the cache.

        logits -- "last": float32 (1, vocab) for the last token (the default for prefill, decode and append);
                  "all": (n, vocab) (the default for verify and rollout); "none": nothing (None).
        hidden -- also return the model's hidden states: (logits, hidden), hidden a tuple of (n, hidden_size)
                  tensors in the model's dtype, transformers' `hidden_states` (the embeddings' output, then each
                  layer's; the last one after the final norm), for decoders that read them (contrastive, dola).
        tree   -- a verify pass of a candidate tree (workbench.decode.tree.CandidateTree): ids are its root then
                  its nodes; each token gets the position root + its depth and attends to its ancestors only.
                  Commit one path with commit(n, rows=...). Needs `takes_tree`."""
        if logits is None:
            logits = "all" if phase in ("verify", "rollout") else "last"
        if logits not in LOGITS:
            raise WorkbenchError(f"logits must be one of {', '.join(LOGITS)}, got {logits!r}")
        device = self.model.device
        ids = torch.as_tensor(ids, dtype=torch.long, device=device)
        ids = ids if ids.dim() == 2 else ids.reshape(1, -1)
        if ids.shape[0] != 1:
            raise WorkbenchError(f"a session runs one sequence; got a batch of {ids.shape[0]}")
        n = ids.shape[1]
        if n == 0:
            raise WorkbenchError(f"a {phase} pass needs at least one token")
        forward = ForwardPass(phase, self.position, n, ids[0], skipped_layers=self._skipped_layers(phase),
                              packed_attention=self.attention.reads_packed)
        watch = self._layer_watch(forward)
        if forward.skipped_layers or watch is not None:
            layers.wrap(self.model.hf)
        positions = torch.arange(forward.start, forward.end, device=device)
        if tree is not None:
            self._check_tree(tree, phase, n)
            forward.tree = tree.ancestors(device)
            positions = forward.start + torch.tensor(tree.depths, device=device)
        started = time.perf_counter()
        self.cache.begin_pass(forward)
        try:
            with torch.inference_mode(), bridge.routed(self.model.hf), \
                    routing.bound(self.model.hf, self._routing(forward)):
                out = self.model.hf(input_ids=ids, position_ids=positions[None],
                                    use_cache=True, **{self._cache_keyword: self.cache},
                                    **(self._keep_last if logits != "all" else {}),
                                    **({"output_hidden_states": True} if hidden else {}),
                                    **{bridge.PASS_KEYWORD: bridge.BoundPass(self.binding, forward, watch)})
        finally:
            self.cache.end_pass()
        result = None if logits == "none" else out.logits[0, -1:].float() if logits == "last" else out.logits[0].float()
        self.note_bytes()
        self.forwards += 1
        seconds = time.perf_counter() - started
        for listener in self.listeners:
            listener(forward, seconds)
        return (result, tuple(h[0] for h in out.hidden_states)) if hidden else result

    def _routing(self, forward: ForwardPass) -> routing.RouterBinding | None:
        return routing.RouterBinding(self.router, self._routing_observer, forward.phase, self.router_state,
                                     routing.following_routers(self.model.hf)) if self._routes else None

    def _skipped_layers(self, phase: str) -> frozenset[int]:
        if not self.router.routes_layers:
            return self.skip_layers
        return self.skip_layers | self.router.skipped_layers(self.router_state, phase, self.model.num_layers)

    def _layer_watch(self, forward: ForwardPass):
        """The pass's watcher of every decoder layer (the layer router's and the observer's), or None."""
        router = self.router if self.router.routes_layers and self.router.watches_layers(
            self.router_state, forward.phase) else None
        observer = self._layer_observer
        if router is None and observer is None:
            return None

        def watch(layer: int, hidden_in, hidden_out, skipped: bool) -> None:
            call = layers.LayerCall(layer, forward.phase, hidden_in, hidden_out, self.model.hf, skipped)
            if router is not None:
                router.observe_layer(call, self.router_state)
            if observer is not None:
                observer.observe_layer(call)
        return watch

    def _check_tree(self, tree, phase: str, n: int) -> None:
        if phase != "verify":
            raise WorkbenchError(f"a candidate tree is fed as a verify pass, not {phase!r}")
        if n != tree.size + 1:
            raise WorkbenchError(f"a tree of {tree.size} nodes is fed as {tree.size + 1} tokens (its root first); "
                                 f"got {n}")
        if not self.takes_tree:
            raise WorkbenchError(f"attention '{self.attention.name}' with cache '{self.policy.name}' cannot verify a "
                                 "tree: it needs a dense attention variant (sdpa, eager, flash) and a cache policy "
                                 "that does not act while decoding")
