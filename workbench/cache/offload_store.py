"""`OffloadedStore`: any store (dense, ragged, quantized, fp8, ...) kept in host memory, brought to the device one
layer at a time, the next layer prefetched on a side CUDA stream (the `offload` policy, workbench.cache.offload).

The scheme of transformers' OffloadedCache (cache_utils, "prefetch layer l+1 while layer l computes, evict layer
l-1"), made generic over stores: an `OffloadedStore` wraps the store of one layer and stands in for it. The
store's tensors are found by walking its attributes (tensors, dicts and lists of them, and nested workbench
objects such as a QuantizedSide), so any store works unchanged. A `Prefetcher`, one per cache, keeps at most
one store resident on the device and one prefetched:

  acquire(store)  the store is needed (a method is called or a tensor attribute read: append, view, keep, the
                  policy's statistics, ...): the resident store is released, this one becomes resident (its
                  prefetched copies once the side stream is done, else a copy now), and the next layer's store is
                  prefetched on the side stream while this layer computes.
  release(store)  its tensors are copied back into pinned host buffers (reused while the shapes hold) on the
                  compute stream, and the device copies are dropped.

Reading plain host-side state (lengths, identity, ...) or the byte counts never moves anything. The resident
layer is copied back whole (as OffloadedCache moves whole layers), whether or not it changed.
On a CPU device the wrapper does nothing (mode "none"); mode "copy" makes real host copies on CPU, which the tests
use to exercise every move without a GPU.
"""

from __future__ import annotations

import copy
import inspect

import torch

MODES = ("cuda", "copy", "none")
OWN = ("inner", "prefetcher", "_host", "_copied_back", "_rest_nbytes")  # the wrapper's own attributes


def _convert(value, fn, path: tuple, memo: dict):
    """value with every tensor t it holds replaced by fn(path, t): dicts and lists in place, tuples rebuilt,
    workbench objects walked attribute by attribute; the same tensor object maps to one result."""
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:
            memo[id(value)] = fn(path, value)
        return memo[id(value)]
    if isinstance(value, dict):
        for key, item in value.items():
            value[key] = _convert(item, fn, (*path, key), memo)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            value[i] = _convert(item, fn, (*path, i), memo)
    elif isinstance(value, tuple) and any(_holds_tensors(item) for item in value):
        return tuple(_convert(item, fn, (*path, i), memo) for i, item in enumerate(value))
    elif _walked(value):
        for key, item in vars(value).items():
            setattr(value, key, _convert(item, fn, (*path, key), memo))
    return value


def _walked(value) -> bool:
    return type(value).__module__.startswith("workbench.") and hasattr(value, "__dict__") \
        and not isinstance(value, type)


def _holds_tensors(value) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_holds_tensors(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensors(item) for item in value)
    return _walked(value) and any(_holds_tensors(item) for item in vars(value).values())


def _tensors(store) -> dict[tuple, torch.Tensor]:
    found: dict[tuple, torch.Tensor] = {}

    def note(path, tensor):
        found[path] = tensor
        return tensor
    _convert(store, note, (), {})
    return found


class Prefetcher:
    """Which store of one cache is resident on the device and which one is prefetched."""

    def __init__(self, device: torch.device, mode: str, prefetch: bool = True):
        if mode not in MODES:
            raise ValueError(f"offload mode must be one of {', '.join(MODES)}; got {mode!r}")
        self.device, self.mode, self.prefetch = torch.device(device), mode, prefetch
        self.stores: list[OffloadedStore] = []  # in layer order: the next one is prefetched
        self.resident: OffloadedStore | None = None
        self.prefetched: tuple[OffloadedStore, dict, object] | None = None  # (store, path -> copy, ready event)
        self.stream = torch.cuda.Stream(self.device) if mode == "cuda" else None
        self.moves = {"fetched": 0, "prefetched": 0, "released": 0}  # counts, for tests and benchmarks

    def __deepcopy__(self, memo):  # a copied cache (Session.fork) gets its own, nothing resident
        return Prefetcher(self.device, self.mode, self.prefetch)

    def acquire(self, store: OffloadedStore) -> None:
        if self.mode == "none" or self.resident is store:
            return
        if self.resident is not None:
            self.release(self.resident)
        waiting, self.prefetched = self.prefetched, None
        if waiting is not None and waiting[0] is not store and waiting[2] is not None:
            torch.cuda.current_stream(self.device).wait_event(waiting[2])  # a dropped prefetch: let it finish
        if waiting is not None and waiting[0] is store:
            copies, ready = waiting[1], waiting[2]
            if ready is not None:  # the compute stream waits for the side stream's copies, and owns them
                torch.cuda.current_stream(self.device).wait_event(ready)
                for tensor in copies.values():
                    tensor.record_stream(torch.cuda.current_stream(self.device))
        else:
            copies = self._copy_in(store, self.stream is None)
            self.moves["fetched"] += 1
        store._host = _tensors(store.inner)
        _convert(store.inner, lambda path, tensor: copies.get(path, tensor), (), {})
        self.resident = store
        following = self.stores[(self.stores.index(store) + 1) % len(self.stores)] if store in self.stores else None
        if self.prefetch and following is not None and following is not store and _holds_tensors(following.inner):
            self.prefetched = (following, self._copy_in(following, False), self._ready())
            self.moves["prefetched"] += 1

    def _copy_in(self, store: OffloadedStore, here: bool) -> dict[tuple, torch.Tensor]:
        """Device copies of a store's host tensors: on the side stream (after its last copy back), or here."""
        host = _tensors(store.inner)
        if self.mode == "copy":
            return {path: _like(tensor, torch.clone) for path, tensor in host.items()}
        stream = torch.cuda.current_stream(self.device) if here else self.stream
        with torch.cuda.stream(stream):
            if store._copied_back is not None:
                stream.wait_event(store._copied_back)
            return {path: _like(tensor, lambda t: t.to(self.device, non_blocking=True)) for path, tensor in host.items()}

    def _ready(self):
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def release(self, store: OffloadedStore) -> None:
        """Copy the resident store back into host buffers (on the compute stream) and drop its device copies."""
        host, self.resident = store._host, None

        def back(path, tensor):
            if tensor.device.type == "cpu" and self.mode == "cuda":
                return tensor
            old = host.get(path)
            if old is None or old.shape != tensor.shape or old.dtype != tensor.dtype or \
                    (self.mode == "cuda" and not old.is_pinned()):
                old = _like(tensor, lambda t: torch.empty(t.shape, dtype=t.dtype, device="cpu",
                                                          pin_memory=self.mode == "cuda"))
            with torch.inference_mode(old.is_inference()):
                old.copy_(tensor, non_blocking=self.mode == "cuda")
            return old
        _convert(store.inner, back, (), {})
        store._host = {}
        store._rest_nbytes = store.inner.nbytes()
        if self.mode == "cuda":
            store._copied_back = torch.cuda.Event()
            store._copied_back.record(torch.cuda.current_stream(self.device))
        self.moves["released"] += 1

    def settle(self) -> None:
        """Everything back in host memory and the copies finished (before a deep copy reads the host tensors)."""
        self.prefetched = None
        if self.resident is not None:
            self.release(self.resident)
        if self.mode == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


def _like(tensor: torch.Tensor, make):
    """make(tensor) as an inference tensor exactly when `tensor` is one (stores hold a session's inference
    tensors, or plain ones under model.generate, and are updated in place in the same mode)."""
    with torch.inference_mode(tensor.is_inference()):
        return make(tensor)


class OffloadedStore:
    """Stands in for one layer's store: attribute reads and method calls go to the wrapped store, which is made
    resident on the device first when what is read holds tensors."""

    def __init__(self, inner, prefetcher: Prefetcher):
        self.__dict__.update(inner=inner, prefetcher=prefetcher, _host={}, _copied_back=None,
                             _rest_nbytes=inner.nbytes())
        prefetcher.stores.append(self)

    def __getattr__(self, name):
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        value = getattr(inner, name)
        if inspect.ismethod(value) or _holds_tensors(value):
            self.prefetcher.acquire(self)
            value = getattr(inner, name)
        return value

    def __setattr__(self, name, value):
        if name in OWN:
            self.__dict__[name] = value
        else:
            setattr(self.inner, name, value)  # e.g. CacheLayer sets the store's `identity`

    def __deepcopy__(self, memo):
        self.prefetcher.settle()
        return OffloadedStore(copy.deepcopy(self.inner, memo), copy.deepcopy(self.prefetcher, memo))

    def nbytes_by_component(self) -> dict[str, int]:
        """{"host": bytes in host memory, "device": bytes of device copies now (the resident or prefetched
        layer)}, each as the wrapped store counts its bytes. Nothing moves to answer."""
        prefetcher = self.prefetcher
        if prefetcher.mode == "none":
            return {"host": self.inner.nbytes(), "device": 0}
        if prefetcher.resident is self:
            return {"host": self._rest_nbytes if self._host else 0, "device": self.inner.nbytes()}
        held = self.inner.nbytes()
        prefetched = prefetcher.prefetched is not None and prefetcher.prefetched[0] is self
        return {"host": held, "device": held if prefetched else 0}

    def nbytes(self) -> int:
        return sum(self.nbytes_by_component().values())

    def __repr__(self) -> str:
        return f"OffloadedStore({type(self.inner).__name__}, {self.prefetcher.mode})"


def offload(cache, device, mode: str, prefetch: bool = True):
    """Wrap every layer's store of `cache` (a KVCache) in place; returns the cache."""
    prefetcher = Prefetcher(device, mode, prefetch)
    for layer in cache.layers:
        layer.store = OffloadedStore(layer.store, prefetcher)
    cache.prefetcher = prefetcher
    return cache
