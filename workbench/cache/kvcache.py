"""`KVCache`: a transformers `Cache` = one store per layer x one policy, transactional.

Every forward pass is announced with `begin_pass(ForwardPass(phase, start, count, token_ids))` (the session does
it, and workbench's hook does it under `model.generate`): the phase and the positions travel with the pass, so no
layer counts tokens or guesses a phase from how many queries there are. The layers append to their stores; the
attention bridge asks the cache for the slot mask of each call and hands it the attention afterwards, and the
policy observes and evicts (see workbench.cache.base.CachePolicy).

Transactions. A verify or rollout pass is provisional: its tokens are an uncommitted tail that is never freed.
Its query rows are observed one at a time on tentative state (the bridge runs such a pass row by row when the
policy acts while decoding), and what a policy would evict is only hidden from the later rows, so each row sees
what it would have seen had the tokens come one by one. Each row's tentative state is kept, so
  commit(position)   keeps the tail before `position`, adopts the state after its last row, frees what that state
                     hid (policies that merge entries, which cannot be tentative, observe the accepted rows and
                     evict once here), and drops the rest of the tail;
  rollback(position) restores the stores, positions and policy statistics exactly as they were when the run was
                     at `position` (any position of the open tail, or the last committed one).
A prefill, decode or append pass while a tail is open is refused: commit or roll back first.
A store that compresses what it holds (workbench.cache.quantized_store) compresses committed tokens only: each
layer tells its store to `settle()` right after a committed pass's update (that pass's attention has its view)
and at commit, so a tail is never compressed and rollback restores it exactly.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from workbench.attention.base import DECODING, PHASES, PROVISIONAL
from workbench.cache.storage import DenseStore, holes_allowed
from workbench.errors import WorkbenchError


@dataclass
class ForwardPass:
    """One forward pass as the cache sees it: what phase, which positions, which tokens."""

    phase: str
    start: int  # position of the first token
    count: int  # tokens in the pass
    token_ids: torch.Tensor | None = None  # (count,) long, for policies that read the text (sentence_kv)
    # a tree verify pass (workbench.decode.tree): bool (count, count), row i may see row j of the pass (j is i or
    # an ancestor); None: the pass's tokens are one sequence
    tree: torch.Tensor | None = None
    skipped_layers: frozenset = frozenset()  # decoder layers this pass skips (workbench.run.layers): no new slots
    # the pass's attention variant reads packed quantized KV itself (`AttentionVariant.reads_packed`): a decoding
    # pass over a packed store hands transformers only its new tokens, and the bridge the store's packed form
    packed_attention: bool = False

    def __post_init__(self):
        if self.phase not in PHASES:
            raise WorkbenchError(f"unknown phase {self.phase!r}; phases: {', '.join(PHASES)}")

    @property
    def provisional(self) -> bool:
        return self.phase in PROVISIONAL

    @property
    def end(self) -> int:
        return self.start + self.count


@dataclass
class _Row:
    """A provisional query row's tentative state, kept so that commit can adopt it."""

    position: int
    snapshot: dict
    call: Any = None
    result: Any = None


@dataclass
class _Tail:
    """The open provisional tail of one layer: the state before it and after each row observed."""

    before: dict
    start: int  # the tail's first position
    rows: list[_Row] = field(default_factory=list)

    def state_at(self, position: int) -> dict:
        """The state once every row before `position` was observed."""
        done = [row for row in self.rows if row.position < position]
        return done[-1].snapshot if done else self.before


class CacheLayer(CacheLayerMixin):
    """A transformers cache layer over a store; what a policy reads and changes of one layer.

    Policies read `held`, `positions()`, `valid(call)`, `held_keys()`, `held_values()` and their statistics (`extra`), keep
    per-layer values in `state` (replace values, never mutate them in place: they are snapshotted shallowly), and
    change the cache only through `keep` and `merge`."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, cache: KVCache, index: int, store: DenseStore):
        super().__init__()
        self.cache, self.index, self.store = cache, index, store
        self.next_position = 0  # positions handed to this layer so far
        self.state: dict[str, Any] = {"decode_steps": 0}
        self.hidden_count: list[int] = []  # per head: slots hidden by a tentative eviction (open tail only)
        self.freed: list[int] = []  # per head: slots freed one at a time and not compacted yet (holes)
        self.tail: _Tail | None = None
        self.packed = None  # this pass's packed form of a quantized store, for the bridge (see `update`)
        self.reads_view = False  # the variant cannot read this layer packed (soft-capping, a sliding window)
        self.events: list[tuple] = []  # (valid-before mask, positions, alive mask, merged_into) per compaction

    # -- transformers' cache layer interface ------------------------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise WorkbenchError(f"workbench caches hold one sequence; got a batch of {key_states.shape[0]}")
        start = self.cache.pass_start(self, key_states.shape[-2])
        if self.cache.current is not None and self.cache.current.provisional and self.tail is None:
            self.tail = _Tail(self.snapshot(), start)  # what rollback restores
        self.store.append(key_states[0], value_states[0], start)
        if not self.hidden_count:
            self.hidden_count = [0] * self.store.num_heads
            self.freed = [0] * self.store.num_heads
        self.next_position = start + key_states.shape[-2]
        self.is_initialized = True
        if self._hands_packed():  # the bridge gives the attention the codes (kernels/packed_decode.py), not a view
            self.packed = self.store.packed()  # taken before settle: this pass reads its own tokens unquantized
            view = key_states, value_states  # a stand-in transformers passes on; the bridge reads `packed`
        else:
            view = self.store.view()  # what this pass's attention reads: its own tokens as they came
        if self.tail is None:  # they are final: a compressing store (quantized) may compress them now
            self.store.settle()
        return view

    def _hands_packed(self) -> bool:
        forward = self.cache.current
        return (forward is not None and forward.packed_attention and forward.phase in DECODING
                and not self.reads_view and not self.cache.shares_kv and hasattr(self.store, "packed"))

    def get_seq_length(self) -> int:
        return self.next_position  # transformers derives the next positions and the mask sizes from this

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.next_position + query_length, 0  # masks are built over positions, gathered at slots later

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        self.cache.crop(tokens_to_remove)

    def reset(self) -> None:
        raise WorkbenchError("a workbench cache is not reused across runs: build a fresh one with policy.build(model)")

    def reorder_cache(self, beam_idx) -> None:
        raise WorkbenchError("workbench caches hold one sequence: beam search over them is not supported")

    # -- what policies read -------------------------------------------------------------------------------------
    @property
    def held(self) -> list[int]:
        """Tokens each KV head holds (hidden ones excluded), known on the host."""
        return [n - h - f for n, h, f in zip(self.store.lengths, self.hidden_count, self.freed)] or \
            [0] * self.cache.num_kv_heads

    @property
    def num_heads(self) -> int:
        return self.store.num_heads

    def positions(self) -> torch.Tensor:
        """Long (kv_heads, slots): the position in each slot, -1 for padding."""
        return self.store.all_positions()

    def hidden(self) -> torch.Tensor | None:
        """Bool (kv_heads, slots): slots a tentative eviction hid (None when nothing is hidden)."""
        if not any(self.hidden_count):
            return None
        return self.store.extra("hidden", False, torch.bool)

    def valid(self, call=None) -> torch.Tensor:
        """Bool (kv_heads, slots): slots holding a token (not padding, not hidden) at or before the call's last
        query, i.e. what this layer holds as far as the call's step is concerned."""
        positions = self.positions()
        valid = positions >= 0
        if call is not None and call.start + call.num_queries < self.next_position:
            valid &= positions < call.start + call.num_queries  # later rows of the same pass do not exist yet
        hidden = self.hidden()
        return valid if hidden is None else valid & ~hidden

    def newest(self, call) -> int:
        """The position of the call's last query: the newest token the layer holds for that step."""
        return call.start + call.num_queries - 1

    def held_at(self, call) -> list[int]:
        """Tokens each head holds as far as the call's step is concerned (later rows of its pass excluded)."""
        later = self.next_position - (call.start + call.num_queries)
        return [n - later for n in self.held]

    def held_keys(self) -> torch.Tensor:
        return self.store.view()[0][0]

    def held_values(self) -> torch.Tensor:
        return self.store.view()[1][0]

    def extra(self, name: str, fill: float = 0.0, dtype: torch.dtype = torch.float32, trailing=()) -> torch.Tensor:
        """A per-slot statistic of the policy (kv_heads, slots, *trailing), kept aligned with the slots."""
        return self.store.extra(name, fill, dtype, trailing)

    # -- what policies change -------------------------------------------------------------------------------------
    def keep(self, alive: torch.Tensor, counts: list[int], call=None, merged_into: torch.Tensor | None = None) -> None:
        """Keep the valid slots marked in `alive` (kv_heads, slots), `counts` per head, and let the others go. Inside
        an open provisional tail they are only hidden (freed at commit, restored by rollback); otherwise freed now.
        merged_into -- per slot, the position a dropped entry was merged into (-1: dropped), for the trace."""
        valid = self.valid(call)
        dropped = valid & ~alive
        if self.tail is not None:
            if merged_into is not None:
                raise WorkbenchError("merges cannot be tentative: a merging policy evicts at commit")
            hidden = self.store.extra("hidden", False, torch.bool)
            hidden |= dropped
            self.hidden_count = [h + n - c for h, n, c in zip(self.hidden_count, self.held_at(call), counts)]
            return
        self._compact(valid, (self.positions() >= 0) & ~dropped, list(counts), merged_into)

    def keep_slots(self, index: torch.Tensor, counts: list[int], call=None) -> None:
        """Keep, per head h, the slots index[h] (ascending; every head keeps the same count) and let the others go:
        the fast form of `keep` (no mask to sort), for policies that keep equal counts on every head."""
        if self.tail is not None or self.cache.record_events or any(self.freed):
            alive = torch.zeros(self.positions().shape, dtype=torch.bool, device=index.device)
            return self.keep(alive.scatter_(1, index, True), counts, call)
        self.store.keep_slots(index, list(counts))

    def drop(self, slot: torch.Tensor, call=None, dropping: list[int] | None = None,
             merged_into: torch.Tensor | None = None) -> None:
        """Let one slot per head go (slot: long (kv_heads, 1); `dropping`: per head 1 or 0, None for all), the
        steady state of decoding at a budget. The slot is freed in place (a hole the slot mask hides)
        and holes are compacted once there are `holes_allowed` of them, so a step costs
        a few small ops instead of moving the whole cache; inside a provisional tail it is only hidden.
        merged_into -- long (kv_heads, 1): the position the dropped entry was merged into (-1: none), for the trace."""
        positions = self.store.positions
        dropping = dropping or [1] * self.num_heads
        heads = None if min(dropping) == 1 else torch.tensor(dropping, device=slot.device)[:, None] == 1
        if self.tail is not None:
            hidden = self.store.extra("hidden", False, torch.bool)
            hidden.scatter_(1, slot, True if heads is None else heads | hidden.gather(1, slot))
        else:
            if self.cache.record_events:
                gone = torch.zeros(self.positions().shape, dtype=torch.bool, device=slot.device)
                gone.scatter_(1, slot, True if heads is None else heads)
                merged = None if merged_into is None else torch.full_like(self.positions(), -1).scatter_(
                    1, slot, merged_into)
                self.events.append((gone, self.positions().clone(), ~gone, merged))
            positions.scatter_(1, slot, -1 if heads is None else torch.where(heads, -1, positions.gather(1, slot)))
            self.store.identity = False
        if self.tail is not None:
            self.hidden_count = [h + d for h, d in zip(self.hidden_count, dropping)]
            return
        self.freed = [f + d for f, d in zip(self.freed, dropping)]
        held = self.held
        if max(self.freed) >= holes_allowed(min(held)):
            self.store.keep(self.positions() >= 0, held)
            self.freed = [0] * len(self.freed)

    def merge(self, into: torch.Tensor, sources: torch.Tensor, weights: torch.Tensor,
              self_weights: torch.Tensor) -> None:
        """Fold entries into kept ones (see DenseStore.merge); only outside a provisional tail."""
        if self.tail is not None:
            raise WorkbenchError("merges cannot be tentative: a merging policy evicts at commit")
        self.store.merge(into, sources, weights, self_weights)

    def _compact(self, valid: torch.Tensor, alive: torch.Tensor, lengths: list[int], merged_into) -> None:
        if self.cache.record_events:
            self.events.append((valid.clone(), self.positions().clone(), alive.clone(),
                                None if merged_into is None else merged_into.clone()))
        self.store.keep(alive, lengths)  # holes (position -1) are not alive: they go too
        self.freed = [0] * len(self.freed)

    # -- transactions -------------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """The layer's mutable state (statistics, per-layer values, hidden counts) as it is now."""
        return {"extras": self.store.snapshot_extras(), "state": _shallow(self.state),
                "hidden_count": list(self.hidden_count), "freed": list(self.freed)}

    def restore(self, saved: dict) -> None:
        self.store.restore_extras(saved["extras"])
        self.state = _shallow(saved["state"])
        self.hidden_count = list(saved["hidden_count"]) or self.hidden_count
        self.freed = list(saved["freed"]) or self.freed

    def crop_to(self, position: int) -> None:
        """Drop the tail's slots at positions >= `position` (present on every head: a tail is never freed)."""
        drop = self.next_position - position
        if drop <= 0:
            return
        self.store.crop(position, [n - drop for n in self.store.lengths])
        self.next_position = position

    def note_row(self, call, result) -> None:
        """Keep the tentative state after a provisional row (what commit adopts)."""
        if self.tail is not None:
            self.tail.rows.append(_Row(call.start + call.num_queries - 1, self.snapshot(), call, result))

    def rollback(self, position: int) -> None:
        if self.tail is not None:
            state = self.tail.state_at(position)
            self.tail.rows = [row for row in self.tail.rows if row.position < position]
        else:
            state = None
        self.crop_to(position)
        if state is not None:
            self.restore(state)
        if position <= self.cache.committed:
            self.tail = None
            self.hidden_count = [0] * len(self.hidden_count)
            if "hidden" in self.store.extras:
                self.store.extra("hidden", False, torch.bool).zero_()

    def keep_tail_rows(self, start: int, rows: list[int]) -> None:
        """Keep only the tail's rows `rows` (offsets from `start`, ascending, 0 first) and give them consecutive
        positions start, start + 1, ...: a tree verify pass keeps one root-to-leaf path. Only for policies that
        did not act on the tail (nothing of it is hidden)."""
        store, tail = self.store, self.next_position - start
        positions = store.all_positions()
        wanted = torch.zeros(tail, dtype=torch.bool, device=positions.device)
        wanted[rows] = True
        offset = positions - start
        alive = (positions >= 0) & ((offset < 0) | wanted[offset.clamp(0, tail - 1)])
        identity = store.identity and not any(self.freed)
        store.keep(alive, [n - f - (tail - len(rows)) for n, f in zip(store.lengths, self.freed)])
        self.freed = [0] * len(self.freed)
        renumber = torch.full((tail,), -1, dtype=torch.long, device=positions.device)
        renumber[rows] = torch.arange(start, start + len(rows), device=positions.device)
        positions = store.all_positions()
        moved = positions >= start
        positions[moved] = renumber[positions[moved] - start]
        store.identity = identity  # the kept path now sits at the next positions, in order
        self.next_position = start + len(rows)

    def commit(self, position: int, policy, rows: list[int] | None = None) -> None:
        tail, self.tail = self.tail, None
        accepted = [row for row in tail.rows if row.position < position] if tail is not None else []
        if rows is not None and tail is not None:
            self.keep_tail_rows(tail.start, rows)
        self.crop_to(position)
        if tail is not None:
            self.restore(accepted[-1].snapshot if accepted else tail.before)
            if not tail.rows and policy.needs_bridge:  # a policy that saw no rows (it does not act while decoding)
                self.state["decode_steps"] += position - tail.start  # still counts the steps (a full cache has none)
        if any(self.hidden_count):  # free what the adopted state hid
            hidden = self.store.extra("hidden", False, torch.bool)
            valid = self.positions() >= 0
            self.hidden_count, lengths = [0] * len(self.hidden_count), self.held
            self._compact(valid, valid & ~hidden, lengths, None)
            self.store.extra("hidden", False, torch.bool).zero_()
        if accepted and not policy.tentative:  # merging policies evict once, on the committed state
            policy.evict(self, accepted[-1].call, accepted[-1].result)
        self.store.settle()  # the accepted tokens are final: a compressing store may compress them now


def _shallow(state: dict) -> dict:
    """A copy of a layer's state dict whose lists and dicts are copies too (values are replaced, not mutated)."""
    return {k: copy.copy(v) if isinstance(v, (list, dict)) else v for k, v in state.items()}


class KVCache(Cache):
    """A transformers Cache whose layers keep keys and values in stores and let `policy` decide what stays."""

    def __init__(self, config, policy, store: Callable[[], DenseStore] = DenseStore):
        """store -- builds one layer's store: a store class, or a policy's `new_store` (parameters bound)."""
        text = config.get_text_config(decoder=True)
        self.num_layers = text.num_hidden_layers
        self.num_kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        # layers that reuse another layer's keys and values (Gemma 3n) take what its update returned, so every
        # update must return the whole cache: no packed stand-ins
        self.shares_kv = bool(getattr(text, "num_kv_shared_layers", 0))
        super().__init__(layers=[CacheLayer(self, i, store()) for i in range(self.num_layers)])
        self.policy = policy
        self.current: ForwardPass | None = None  # the pass under way
        self.committed = 0  # positions before this are final
        self.state: dict[str, Any] = {}  # the policy's run state across layers (budgets, ...)
        self.record_events = False  # keep what was evicted, for the trace (costs a copy per eviction)
        self.peak_nbytes = 0  # the most the buffers occupied at any moment, a multi-token pass's uncompressed
        # keys and values included (measured before each layer's eviction; a one-token pass adds one slot at most)

    # -- passes ---------------------------------------------------------------------------------------------------
    @property
    def position(self) -> int:
        """The next position: every token handed to the cache so far, provisional ones included."""
        return self.layers[0].next_position

    @property
    def tail_open(self) -> bool:
        return self.position > self.committed

    def begin_pass(self, forward: ForwardPass) -> None:
        if forward.start != self.position:
            raise WorkbenchError(f"a pass starting at position {forward.start} cannot follow the cache's "
                                 f"{self.position} tokens")
        if forward.phase == "prefill" and self.position:
            raise WorkbenchError("a prefill must be the cache's first pass; later turns are 'append' passes")
        if not self.position and forward.phase != "prefill":
            raise WorkbenchError(f"the first pass over a cache is its prefill, not {forward.phase!r}")
        if not forward.provisional and self.tail_open:
            raise WorkbenchError(f"{self.position - self.committed} provisional tokens are open: commit(n) or "
                                 f"rollback(mark) before a {forward.phase} pass")
        self.current = forward
        self.policy.begin_pass(self, forward)

    def end_pass(self) -> None:
        forward, self.current = self.current, None
        for layer in self.layers:
            layer.packed = None  # a packed form is for its own pass only
        self.peak_nbytes = max(self.peak_nbytes, self.nbytes())
        if forward is not None and not forward.provisional:
            self.committed = self.position

    def pass_start(self, layer: CacheLayer, count: int) -> int:
        """Where the tokens a layer is given start: the announced pass's start."""
        if self.current is None:
            if self.policy.needs_bridge:
                raise WorkbenchError(
                    f"cache '{self.policy.name}' acts on each layer's attention, which it sees through workbench: "
                    "use workbench.generate or a workbench.run.Session, or run model.generate inside "
                    "`with workbench.run.use_attention(model, 'sdpa', cache=cache):`")
            return layer.next_position  # a plain forward over a cache that keeps everything
        if count != self.current.count:
            raise WorkbenchError(f"layer {layer.index} got {count} tokens in a pass of {self.current.count}")
        return self.current.start

    def commit(self, position: int, rows: list[int] | None = None) -> None:
        """Keep the provisional tokens before `position`, drop the rest (see the module docstring). `rows`: keep
        these tail tokens instead (offsets into the tail, ascending, the first one 0, position - committed of
        them), renumbered to consecutive positions: a tree verify pass keeps one path."""
        if not self.committed <= position <= self.position:
            raise WorkbenchError(f"commit({position}) is outside the open tail [{self.committed}, {self.position}]")
        if rows is not None:
            tail = self.position - self.committed
            if (len(rows) != position - self.committed or (rows and rows[0] != 0) or sorted(set(rows)) != rows
                    or (rows and rows[-1] >= tail)):
                raise WorkbenchError(f"commit rows must be {position - self.committed} ascending offsets into the "
                                     f"{tail} provisional tokens, starting at 0; got {rows}")
            if self.policy.acts_while_decoding:
                raise WorkbenchError(f"cache '{self.policy.name}' acts on provisional rows one by one: it can keep "
                                     "only a prefix of them (commit without rows)")
        with torch.inference_mode():  # the stores hold inference tensors (a session's forward filled them)
            for layer in self.layers:
                layer.commit(position, self.policy, rows)
        self.committed = position

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' crop (assisted generation drops rejected draft tokens it fed as ordinary passes): a
        negative count drops that many newest tokens, a positive one is the length to keep. Only a cache whose
        policy never acts on attention (the full cache) can forget committed tokens; the others roll back the
        provisional tail only (a session's verify pass is the way to check a draft)."""
        position = self.position + tokens_to_remove if tokens_to_remove < 0 else tokens_to_remove
        if position < self.committed and not self.policy.needs_bridge:
            with torch.inference_mode():
                for layer in self.layers:
                    layer.crop_to(position)
            self.committed = position
            return
        self.rollback(position)

    def rollback(self, position: int) -> None:
        """Return to the state at `position` (a committed position, or one inside the open tail)."""
        if not self.committed <= position <= self.position:
            raise WorkbenchError(f"cannot roll back to position {position}: only the provisional tokens "
                                 f"[{self.committed}, {self.position}) can be rolled back")
        with torch.inference_mode():
            for layer in self.layers:
                layer.rollback(position)

    # -- the attention bridge's hooks -------------------------------------------------------------------------------
    def wants(self, layer_idx: int, phase: str) -> frozenset[str]:
        return self.policy.wants(layer_idx, phase)

    def sequential(self, call) -> bool:
        """Whether the bridge must run this call one query row at a time (a provisional pass the policy acts on)."""
        return call.provisional and call.num_queries > 1 and self.policy.acts_while_decoding

    def attention_mask(self, call, hf_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Bool (1, kv_heads, q, slots) of the slots each query may see: transformers' mask (built over positions)
        read at the position each slot holds, minus hidden slots, narrowed by the policy's own selection. None
        when plain causal attention over the view is already right."""
        layer = self.layers[call.layer]
        store = layer.store
        hidden = layer.hidden()
        restrict = self.policy.visible(layer, call)
        if store.identity and hidden is None and restrict is None:
            return hf_mask
        lengths = store.lengths
        plain = hf_mask is None and hidden is None and restrict is None and not any(layer.freed)
        if plain and len(set(lengths)) == 1 and (call.num_queries == 1 or call.num_queries == lengths[0]):
            return None  # every held slot is in the past of the query (or the slots are the queries)
        positions = store.all_positions()
        if hf_mask is None:
            queries = call.positions()
            visible = (positions[:, None, :] >= 0) & (positions[:, None, :] <= queries[None, :, None])
        else:
            visible = hf_mask[0, 0][:, positions.clamp_min(0)].transpose(0, 1) & (positions[:, None, :] >= 0)
        if hidden is not None:
            visible &= ~hidden[:, None, :]
        if restrict is not None:
            visible &= restrict
        return visible[None]

    def tree_mask(self, call, mask: torch.Tensor | None, forward: ForwardPass) -> torch.Tensor:
        """`mask` (what attention_mask gave; None: causal) narrowed for a tree verify pass: among the pass's own
        slots a query sees only its ancestors and itself (forward.tree)."""
        positions = self.layers[call.layer].store.all_positions()  # (kv_heads, slots)
        offset = positions - forward.start  # the pass's row in each slot; negative before the pass
        in_pass = offset >= 0
        sees = forward.tree[:, offset.clamp(0, forward.count - 1)].transpose(0, 1)  # (kv_heads, q, slots)
        allowed = ~in_pass[:, None, :] | sees
        if mask is None:
            queries = call.positions()
            mask = ((positions >= 0)[:, None, :] & (positions[:, None, :] <= queries[None, :, None]))[None]
        return mask & allowed[None]

    def attended(self, call) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values the call's queries read (the policy may move keys, see CachePolicy.attended)."""
        return self.policy.attended(self.layers[call.layer], call)

    def take_packed(self, layer_idx: int):
        """The layer's packed quantized KV (workbench.cache.quantized_store.PackedLayer) when this pass hands the
        attention its codes instead of a view (ForwardPass.packed_attention); None otherwise. Taken once."""
        layer = self.layers[layer_idx]
        packed, layer.packed = layer.packed, None
        return packed

    def read_view(self, layer_idx: int) -> None:
        """The attention variant cannot read this layer's packed codes (its options): hand it views from now on."""
        self.layers[layer_idx].reads_view = True

    def slot_positions(self, layer_idx: int) -> torch.Tensor | None:
        return self.layers[layer_idx].store.slot_positions()

    def after_attention(self, call, result) -> None:
        """The layer's attention ran: let the policy observe and evict (tentatively, inside a provisional pass)."""
        layer = self.layers[call.layer]
        if call.provisional and not self.policy.acts_while_decoding:
            return  # nothing to observe; commit counts the accepted steps
        if call.decoding:  # every decoded token is a step (a provisional pass arrives here row by row)
            layer.state["decode_steps"] += call.num_queries
        self.policy.observe(layer, call, result)
        if call.num_queries > 1:  # the pass's tokens are all held, none evicted yet: the transient peak
            self.peak_nbytes = max(self.peak_nbytes, self.nbytes())
        if not call.provisional or self.policy.tentative:
            self.policy.evict(layer, call, result)
        if call.provisional:
            layer.note_row(call, result)

    # -- accounting -----------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes the key/value buffers of every layer occupy."""
        return sum(layer.store.nbytes() for layer in self.layers)

    def nbytes_by_component(self) -> dict[str, int]:
        """`nbytes` by what occupies it, summed over layers: a packed quantized store's codes, scales, zeros and
        full-precision residual; a dense store's key/value buffers count as `dense`."""
        total: dict[str, int] = {}
        for layer in self.layers:
            parts = getattr(layer.store, "nbytes_by_component", None)
            for name, size in (parts() if parts else {"dense": layer.store.nbytes()}).items():
                total[name] = total.get(name, 0) + size
        return total

    @property
    def quantizes(self) -> bool:
        """Whether every layer's store quantizes (and can measure what that costs)."""
        return all(getattr(layer.store, "quantizes", False) for layer in self.layers)

    def measure_quant_error(self) -> None:
        """From now on the stores measure what quantizing costs (`quant_error`); off by default, since measuring
        dequantizes every flush once more."""
        for layer in self.layers:
            layer.store.measure_error = True

    def quant_error(self) -> torch.Tensor | None:
        """Float (layers, kv_heads, 2 sides): each layer and KV head's relative error ||x - x_hat|| / ||x|| of the
        keys (side 0) and of the values (side 1) it quantized while measuring (NaN where none yet; one host read
        for all); None for stores that do not quantize."""
        if not self.quantizes:
            return None
        sides = [sums for layer in self.layers for sums in layer.store.error_sums()]
        device = next((t.device for t in sides if t is not None), None)
        none = torch.zeros(self.num_kv_heads, 2, device=device)
        sums = torch.stack([none if t is None else t for t in sides]).cpu().double()  # (layers * sides, heads, 2)
        return (sums[..., 0] / sums[..., 1]).sqrt().float().reshape(len(self.layers), 2, -1).transpose(1, 2)

    def tokens_held(self) -> torch.Tensor:
        """Long (layers, kv_heads): tokens each layer and KV head holds: its slots, plus the tokens a store keeps
        in another form outside them (`store.tokens_off_slots()`, e.g. shadowkv's compressed chunks)."""
        return torch.tensor([[n + off for n, off in zip(layer.held, _off_slots(layer))] for layer in self.layers],
                            dtype=torch.long)

    def positions(self, layer_idx: int) -> list[torch.Tensor]:
        """Per KV head, the positions layer `layer_idx` holds (ascending)."""
        valid = self.layers[layer_idx].valid()
        positions = self.layers[layer_idx].positions()
        return [positions[h][valid[h]] for h in range(positions.shape[0])]

    def drain_events(self) -> list[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        """(layer, kv_head, freed positions, positions they were merged into or None) since the last call."""
        out = []
        for index, layer in enumerate(self.layers):
            for valid, positions, alive, merged_into in layer.events:
                gone = valid & ~alive
                for head in range(positions.shape[0]):
                    mask = gone[head]
                    if bool(mask.any()):
                        out.append((index, head, positions[head][mask],
                                    None if merged_into is None else merged_into[head][mask]))
            layer.events = []
        return out


def _off_slots(layer) -> list[int]:
    """Per KV head, the tokens the layer's store holds outside its slots (0 for stores that keep every token in
    one)."""
    count = getattr(layer.store, "tokens_off_slots", None)
    return count() if count is not None else [0] * len(layer.held)
