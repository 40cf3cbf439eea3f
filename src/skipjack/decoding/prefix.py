"""Automatic prefix caching across requests: a request whose prompt begins with tokens an earlier request ran
reuses their keys and values and runs only the rest.

The anchors: vLLM's automatic prefix caching (hashed blocks), SGLang's RadixAttention (a radix tree of
sequences), llama-server's `cache_prompt` (a slot's last sequence). Here the unit is a finished request's whole
sequence (its prompt and output, as `Session.end` leaves it): an entry holds one cache and the tokens it holds.

- **Lookup** (`PrefixCache.session()` gives a request a `Session` over the pool): the entry with the longest
  common prefix with the prompt (all but its last token, which must run) is copied, cut to that prefix and
  grown to the request's capacity; the rest of the prompt runs after it (`prefill` from `held`). The entry
  stays for later requests; concurrent requests over one system prompt each copy it. The copy's keys and
  values are the ones a fresh prefill writes for those positions (the same model over the same tokens).
- **Insert**: a request that ends with a whole cache leaves it as a new entry (taken over, not copied); an
  entry whose tokens are a prefix of the new one's is dropped (the new one covers it).
- **Budget**: entries are evicted least recently used (a hit refreshes an entry) while their caches'
  allocated bytes exceed the budget; a cache larger than the whole budget is not kept.
- `Start.ran` says how many prompt tokens ran; the server reports the rest as
  `usage.prompt_tokens_details.cached_tokens`.

A prefix is reused only when at least `min_tokens` tokens match (a shorter one saves less than the copy costs),
only for the model that made it, and never for requests with a KV cache policy (a policy makes its own cache).
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict

from skipjack.cache import KVCache, TrackedCache
from skipjack.decoding.session import Prefill, Session, check_prompt
from skipjack.models import DecoderLM


def allocated(cache: KVCache) -> int:
    """Bytes a cache's key/value tensors take (its whole capacity, not only the positions in use)."""
    return sum(t.numel() * t.element_size() for layer in cache for t in (layer.k, layer.v))


class PrefixCache:
    """The pool of finished requests' caches (see the module docstring). Thread-safe."""

    def __init__(self, budget_bytes: int, min_tokens: int = 16):
        self.budget, self.min_tokens = budget_bytes, min_tokens
        self.entries: OrderedDict[int, tuple[DecoderLM, TrackedCache, int]] = OrderedDict()  # LRU order
        self.lock = threading.Lock()
        self.next_id = 0
        self.hits = self.misses = self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(size for _, _, size in self.entries.values())

    def session(self) -> Session:
        """A per-request session over the pool."""
        return PooledSession(self)

    def take(self, model: DecoderLM, prompt: list[int]) -> TrackedCache | None:
        """A copy of the entry with the longest usable common prefix with `prompt`, cut to it; None if none."""
        with self.lock:
            best, n = None, 0
            for key, (m, held, _) in self.entries.items():
                k = held.common(prompt[:-1]) if m is model else 0
                if k > n and held.cache.resumable(k):
                    best, n = key, k
            if best is None or n < self.min_tokens:
                self.misses += 1
                return None
            self.entries.move_to_end(best)
            self.hits += 1
            held = self.entries[best][1]
            out = TrackedCache(copy.deepcopy(held.cache), held.tokens)  # the entry stays as it is
        out.cut(n)
        return out

    def put(self, model: DecoderLM, held: TrackedCache) -> None:
        """A finished request's cache becomes an entry (covered entries dropped, then the LRU ones over budget)."""
        size = allocated(held.cache)
        if size > self.budget or len(held) < self.min_tokens:
            return
        with self.lock:
            for key, (m, other, _) in list(self.entries.items()):
                if m is model and other.common(held.tokens) == len(other):
                    del self.entries[key]
            self.entries[self.next_id] = (model, held, size)
            self.next_id += 1
            while self.nbytes > self.budget:
                self.entries.popitem(last=False)
                self.evictions += 1

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


class PooledSession(Session):
    """One request's start from the pool, and its end back into it."""

    def __init__(self, pool: PrefixCache):
        super().__init__()
        self.pool = pool

    def begin(self, model: DecoderLM, prompt: list[int], max_new_tokens: int) -> Prefill:
        need = check_prompt(model, prompt, max_new_tokens)
        held = self.pool.take(model, prompt)
        if held is None:
            return Prefill(model, prompt, max_new_tokens)
        cap = held.cache.capacity
        held.fit(need, lambda need: model.make_cache(min(model.config.max_position_embeddings, max(need, cap))))
        return Prefill(model, prompt, max_new_tokens, held.cache, len(held))

    def end(self, model: DecoderLM, cache: KVCache, ctx: list[int], intact: bool) -> None:
        if intact:
            self.pool.put(model, TrackedCache.after(cache, ctx))
