"""Per-layer KV cache: preallocated tensors written in place, rolled back with `trim`; and cache policies.

Every layer owns one object with the same small interface (mlx-lm style):
`update(k, v, start) -> (keys, values, past)`, `offset`, `trim(n)`, `keep(start, idx)`, `nbytes`; for
carrying a conversation's cache to its next request, `resumable(n)` and `moved(fresh)`; and for saving it to
a file and loading it back, `stored()` and `restore(k, v, first)`.

`past` is the absolute positions of the keys `update` returns before the new ones (a `range` when they are
contiguous, else a LongTensor), and attention masks are built from it (`skipjack.models.common`), so a layer
that evicts keys (and holds positions with holes) is just another `LayerKV`. A cache policy makes each
layer's object (`CachePolicy.layer`); `DecoderLM.make_cache(capacity, policy=...)` asks it once per layer.

Writes are position-addressed (gpt-fast style): a forward pass writes its keys at `[start, start + T)`, so a
speculative step can overwrite a rejected draft without any copy, and skipped layers simply do not write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from skipjack.errors import SkipjackError
from skipjack.limits import MAX_DRAFT

SLACK = 2 * MAX_DRAFT  # a sliding layer keeps this many positions beyond its window on each side (rollback)


class LayerKV:
    """Full-attention layer cache. Buffers k, v: [B, H_kv, capacity, D]; positions [0, offset) are valid."""

    sight: tuple[int, int] | None = None  # (window, sinks) a policy masks attention with; None: the model's
    observes = False  # whether the forward shows it each pass's queries (`observe`): attention-scored policies

    def __init__(self, batch: int, heads: int, head_dim: int, capacity: int, dtype: torch.dtype):
        self.k = torch.zeros(batch, heads, capacity, head_dim, dtype=dtype)  # [B, H_kv, C, D]
        self.v = torch.zeros(batch, heads, capacity, head_dim, dtype=dtype)  # [B, H_kv, C, D]
        self.capacity = capacity
        self.offset = 0  # absolute position one past the last valid key

    def reserve(self, start: int, T: int) -> tuple[int, int]:
        """Make room for T new keys at positions [start, start+T) and take them as held: returns the buffer slot
        of the first new key and the absolute position of slot 0 (slots before the first new one hold the past
        keys, in position order). The keys themselves are the caller's to write: `update`, or the native step
        (`skipjack.models.native`), which writes them straight into `k` and `v`."""
        end = start + T
        if start > self.offset or end > self.capacity:
            raise SkipjackError(f"context length {end} exceeds the cache capacity {self.capacity}")
        self.offset = end
        return start, 0

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int):
        """Write k, v [B, H_kv, T, D] at positions [start, start+T); return all valid keys/values (the new ones
        last) and the positions of the keys before the new ones."""
        T = k.shape[2]
        a, first = self.reserve(start, T)
        self.k[:, :, a : a + T] = k
        self.v[:, :, a : a + T] = v
        return self.k[:, :, : a + T], self.v[:, :, : a + T], range(first, start)  # [B, H_kv, a + T, D] x2

    def trim(self, n: int) -> int:
        """Forget the newest n positions (rollback). Returns how many were dropped."""
        n = min(n, self.offset)
        self.offset -= n
        return n

    def keep(self, start: int, idx: list[int]) -> None:
        """Compact a verified token tree: positions start+idx[j] move to start+j; the rest after start go."""
        src = torch.tensor(idx, dtype=torch.long) + (start - self._first())
        dst = slice(start - self._first(), start - self._first() + len(idx))
        self.k[:, :, dst] = self.k.index_select(2, src)
        self.v[:, :, dst] = self.v.index_select(2, src)
        self.offset = start + len(idx)

    def _first(self) -> int:
        return 0

    def span(self, lo: int, hi: int) -> tuple:
        """Copies of this layer's keys and values at positions [lo, hi) (k, v [B, H_kv, hi - lo, D]), to put back
        with `put_span` after a scratch pass over them."""
        a = lo - self._first()
        if a < 0 or hi > self.offset:
            raise SkipjackError(f"positions [{lo}, {hi}) are not all held by cache layer")
        return self.k[:, :, a : a + hi - lo].clone(), self.v[:, :, a : a + hi - lo].clone()

    def put_span(self, lo: int, saved: tuple) -> None:
        k, v = saved[:2]
        a = lo - self._first()
        self.k[:, :, a : a + k.shape[2]] = k
        self.v[:, :, a : a + v.shape[2]] = v

    def resumable(self, n: int) -> bool:
        """Whether, trimmed to its first n positions, this layer still holds every key a query at position n
        may attend to (a sliding layer may have dropped them)."""
        return n <= self.offset

    def moved(self, fresh: LayerKV) -> LayerKV:
        """This layer's keys/values in `fresh` (the same layer of a new, larger cache)."""
        fresh.update(self.k[:, :, : self.offset], self.v[:, :, : self.offset], 0)
        return fresh

    def stored(self):
        """The keys/values this layer holds [B, H_kv, n, D] x2 (views), and the absolute position of the first."""
        n = self.offset - self._first()
        return self.k[:, :, :n], self.v[:, :, :n], self._first()

    def restore(self, k: torch.Tensor, v: torch.Tensor, first: int) -> None:
        """Fill this empty layer with what `stored` returned (for example from a file): positions first, ...."""
        n = k.shape[2]
        want = (*self.k.shape[:2], n, self.k.shape[3])
        if tuple(k.shape) != want or tuple(v.shape) != want or k.dtype != self.k.dtype or n > self.capacity:
            raise SkipjackError(f"saved keys {tuple(k.shape)} {k.dtype} do not fit this cache layer")
        self._set_first(first)
        self.k[:, :, :n], self.v[:, :, :n] = k, v
        self.offset = first + n

    def _set_first(self, first: int) -> None:
        if first != 0:
            raise SkipjackError("a full-attention layer's saved keys must start at position 0")

    @property
    def nbytes(self) -> int:
        """Bytes of keys/values currently held (valid positions only)."""
        held = self.offset - self._first()
        return 2 * held * self.k[:, :, :1].numel() * self.k.element_size()


class SlidingLayerKV(LayerKV):
    """Sliding-window layer cache (Gemma 3 local layers): holds at most window + 2·slack positions.

    The buffer's index 0 is absolute position `first`. When a write would overflow, the oldest keys are
    dropped, but never those that a query may still need after a rollback of up to `slack` positions:
    we keep positions >= start - window - slack.
    """

    def __init__(self, batch, heads, head_dim, window: int, dtype, slack: int = SLACK):
        super().__init__(batch, heads, head_dim, window + 2 * slack, dtype)
        self.window, self.slack, self.first = window, slack, 0

    def _first(self) -> int:
        return self.first

    def _set_first(self, first: int) -> None:
        self.first = first

    def reserve(self, start: int, T: int) -> tuple[int, int]:
        lo = self._check(start)
        if start - lo + T > self.capacity:
            raise SkipjackError(f"{T} new keys do not fit a sliding cache of {self.capacity} slots in one pass")
        if start - self.first + T > self.capacity:  # shift the still-needed keys to the front
            n = start - lo
            self.k[:, :, :n] = self.k[:, :, lo - self.first : start - self.first].clone()
            self.v[:, :, :n] = self.v[:, :, lo - self.first : start - self.first].clone()
            self.first = lo
        self.offset = start + T
        return start - self.first, self.first

    def _check(self, start: int) -> int:
        """The oldest position a write at `start` still needs (raises if `start` cannot be written)."""
        if start > self.offset or start < self.first:
            raise SkipjackError(f"cannot write position {start}: the sliding cache holds [{self.first}, {self.offset})")
        return max(self.first, start - self.window - self.slack)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int):
        T = k.shape[2]
        lo = self._check(start)
        if start - lo + T > self.capacity:  # a long prefill chunk: attend over a concatenation, store the tail
            keys = torch.cat([self.k[:, :, lo - self.first : start - self.first], k], dim=2)  # [B, H, S, D]
            vals = torch.cat([self.v[:, :, lo - self.first : start - self.first], v], dim=2)  # [B, H, S, D]
            tail = self.capacity - self.slack
            self.k[:, :, :tail] = keys[:, :, -tail:]
            self.v[:, :, :tail] = vals[:, :, -tail:]
            self.first, self.offset = start + T - tail, start + T
            return keys, vals, range(lo, start)
        return super().update(k, v, start)

    def trim(self, n: int) -> int:
        n = min(n, self.offset - self.first)
        self.offset -= n
        return n

    def resumable(self, n: int) -> bool:
        return self.first <= max(0, n - self.window + 1) and n <= self.offset

    def moved(self, fresh: LayerKV) -> LayerKV:
        return self  # its size does not depend on the request's capacity


class KVCache(list):
    """One cache object per layer, in layer order. The sequence offset is the furthest any layer reached.
    `policy` made the layers (default `FullKV`); the decode loop calls `settle` after the prompt and after every
    step (a policy may compress then) and keeps each speculative step within `room`."""

    def __init__(self, layers=(), capacity: int = 0, policy: CachePolicy | None = None, scale: float = 1.0):
        super().__init__(layers)
        self.capacity = capacity  # positions the request may reach
        self.policy = policy if policy is not None else FullKV()  # the cache policy
        self.scale = scale  # the model's attention scale (for scoring)
        self.state: dict = {}  # the policy's per-cache state (its next compression point)

    def settle(self) -> None:
        """The prompt or a step is done: the policy may compress now."""
        self.policy.settle(self)

    def room(self) -> int:
        """Positions a step may write before the policy's next compression point."""
        return self.policy.room(self)

    def capacity_left(self) -> int:
        return self.capacity - self.offset

    @property
    def offset(self) -> int:
        return max(layer.offset for layer in self)

    def trim(self, n: int) -> None:
        target = self.offset - n
        for layer in self:
            if layer.offset > target:
                layer.trim(layer.offset - target)

    def span(self, lo: int, hi: int) -> list[tuple]:
        """Copies of every layer's keys/values at positions [lo, hi) (all held), to `put_span` back later."""
        return [layer.span(lo, hi) for layer in self]

    def put_span(self, lo: int, saved: list[tuple]) -> None:
        """Write back what `span(lo, ...)` copied (a scratch pass overwrote those positions)."""
        for layer, part in zip(self, saved):
            layer.put_span(lo, part)

    def rewind(self, position: int) -> None:
        """Forget every key at or after `position` in every layer (a draft's scratch keys)."""
        for layer in self:
            if layer.offset > position:
                layer.trim(layer.offset - position)

    @contextmanager
    def scratch(self, lo: int | None = None) -> Iterator[KVCache]:
        """Draft writes undone on exit: every key written from the current offset on is forgotten (`rewind`), and
        with `lo`, the keys at positions [lo, offset), which a scratch pass may overwrite, are copied first and
        put back (`span` / `put_span`), so the cache is left as it was found, bit for bit."""
        at = self.offset
        saved = self.span(lo, at) if lo is not None and lo < at else None
        try:
            yield self
        finally:
            if saved is not None:
                self.put_span(lo, saved)
            self.rewind(at)

    def resumable(self, n: int) -> bool:
        return all(layer.resumable(n) for layer in self)

    def moved(self, fresh: KVCache) -> KVCache:
        """These keys/values in `fresh`, a new cache for the same model with more capacity."""
        fresh[:] = [old.moved(new) for old, new in zip(self, fresh)]
        fresh.policy, fresh.state = self.policy, self.state
        return fresh

    def keep(self, start: int, idx: list[int]) -> None:
        for layer in self:
            if layer.offset > start:
                layer.keep(start, idx)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self)


@dataclass(frozen=True)
class LayerSpec:
    """What a cache policy needs to know to make one layer's cache."""

    index: int  # layer number
    batch: int
    heads: int  # KV heads
    head_dim: int
    capacity: int  # positions the request may reach
    window: int | None  # sliding-window size of the layer's attention, None for full attention
    dtype: torch.dtype
    layers: int = 1  # the model's layer count


class CachePolicy:
    """How a cache keeps its keys (`--kv`, `skipjack.kvpolicies`): it makes each layer's object (`layer`), and
    the decode loop asks it, through `KVCache`, when it may compress (`settle`, `room`); a prompt runs in
    `prompt_chunk` tokens at a time, `compress` after each. A policy object serves one request's cache (a
    cache's state is in `KVCache.state`).

    Capabilities, declared on the class and read by the plan's rules (`skipjack.decoding.plan`), never by name:
    - `lossless`: plain decoding's output, unchanged (only `FullKV`);
    - `plain_only`: it runs plain steps only (a verify pass would see other keys than the steps it checks);
    - `holds_every_key`: every past position's keys stay in the cache, in full and in place (`FullKV`, the
      bf16/int8 storage), so a drafter may read or rewrite them (`span` / `put_span`)."""

    lossless: bool = False
    plain_only: bool = False
    holds_every_key: bool = False

    def layer(self, spec: LayerSpec) -> LayerKV:
        """The cache object for one layer."""
        raise NotImplementedError

    def prompt_chunk(self) -> int:
        """Tokens per prompt pass, `compress` after each (0: the whole prompt at once)."""
        return 0

    def compress(self, cache: KVCache) -> None:
        """Between two parts of a chunked prompt: bring the cache down to the policy's budget."""

    def settle(self, cache: KVCache) -> None:
        """The prompt or a step is done: compress here if the policy's next point is reached."""

    def room(self, cache: KVCache) -> int:
        """Positions a step may write before the next compression point (a draft must not cross it)."""
        return cache.capacity


class FullKV(CachePolicy):
    """Keep every key: a full buffer per layer, or a sliding buffer for a sliding-window layer where that is
    smaller (its window plus the rollback slack on both sides is less than the request's capacity)."""

    lossless = True
    holds_every_key = True

    def layer(self, spec: LayerSpec) -> LayerKV:
        if spec.window is not None and spec.window + 2 * SLACK < spec.capacity:
            return SlidingLayerKV(spec.batch, spec.heads, spec.head_dim, spec.window, spec.dtype)
        return LayerKV(spec.batch, spec.heads, spec.head_dim, spec.capacity, spec.dtype)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class TrackedCache:
    """A KV cache aligned with a token list: position i of `cache` holds the keys/values of `tokens[i]`, for
    every i below len(tokens) (a position past them holds at most scratch). Kept by a conversation
    (`decoding.session.Session`, between requests), by the draft model (its own cache), by kangaroo (its
    adapter's one-layer cache: a `LayerKV` works as well as a `KVCache`) and by triforce (a draft cache filled
    from the target's keys). Each time it is brought to a new token list, the longest common prefix is kept
    (`sync` rolls back the rest and returns the tokens missing); the caller writes their keys and `extend`s.
    `fit` makes the cache, or grows it keeping its keys."""

    def __init__(self, cache=None, tokens: list[int] = ()):
        self.cache = cache  # a KVCache or one LayerKV; None: nothing held yet
        self.tokens: list[int] = list(tokens)  # the tokens whose keys/values `cache` holds, by position

    @classmethod
    def after(cls, cache, ctx: list[int]) -> TrackedCache:
        """`cache` whose position i holds ctx[i] for every i below both its offset and len(ctx) (what a request
        leaves), cut to those positions."""
        n = min(cache.offset, len(ctx))
        held = cls(cache, ctx[:n])
        held.cut(n)
        return held

    def __len__(self) -> int:
        return len(self.tokens)

    def clear(self) -> None:
        self.cache, self.tokens = None, []

    def common(self, tokens: list[int]) -> int:
        """How many leading tokens of `tokens` it holds (0 with no cache)."""
        return common_prefix(self.tokens, tokens) if self.cache is not None else 0

    def cut(self, n: int) -> None:
        """Keep the first n tokens and their positions; forget the rest."""
        self.cache.trim(self.cache.offset - n)
        del self.tokens[n:]

    def sync(self, tokens: list[int]) -> list[int]:
        """Keep the longest common prefix of what it holds and `tokens` (the rest rolled back); return the tokens
        after it, whose keys the caller writes at positions len(self).. and then `extend`s."""
        n = self.common(tokens)
        if self.cache is not None:
            self.cut(n)
        return tokens[n:]

    def extend(self, tokens: list[int]) -> None:
        """Their keys were written at the next positions."""
        self.tokens.extend(tokens)

    def fit(self, need: int, make: Callable[[int], object]) -> None:
        """A cache for at least `need` positions: `make(need)` the first time, or when it holds fewer, a larger
        one from `make(need)` holding the same keys (`moved`)."""
        if self.cache is None:
            self.cache = make(need)
        elif need > self.cache.capacity:
            self.cache = self.cache.moved(make(need))
