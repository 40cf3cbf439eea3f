"""Cache policies that evict keys: the per-layer cache with holes, attention scoring, and when to compress.

A policy (`EvictionPolicy`) makes one `EvictingLayerKV` per full-attention layer (a sliding-window layer, as
in Gemma 3, keeps its own bounded window: the policy applies to the global layers). The decode loop tells the
cache when a step is settled (`KVCache.settle`): right after the prompt, and, with `every=N` (decoding-time
compression, as kvpress's DecodingPress), each time the context reaches a multiple of N past the prompt. The
policy then compresses: per-layer budgets (`allocate`: uniform here; PyramidKV and CAKE override it) out of
`budget` × the context, each layer's keys scored (`scores`), the best kept per KV head plus the last `window`
positions, and the kept keys copied into smaller tensors: the old ones are freed, so eviction is memory.

Exact under speculation, relative to plain decoding with the same policy: compression happens only at those
positions and a speculative step never crosses one (`room`: the decode loop caps its draft), so a verified
step meets the same cache that plain steps would. What scoring learns from queries (`observe`) counts a
pass's rows only once they are accepted (rows rolled back by `trim`, or left off by `keep`, are dropped), and
each row is scored alone over its own visible keys, as the plain step that would have run it.
"""

from __future__ import annotations

import math

import torch

from skipjack import validate
from skipjack.cache import CachePolicy, FullKV, KVCache, LayerKV, LayerSpec
from skipjack.errors import SkipjackError
from skipjack.limits import MAX_DRAFT

GROW = 64  # free slots a compacted layer keeps for what comes next (then it grows by a quarter)
SMALL = MAX_DRAFT + 1  # a pass of at most this many rows may be rolled back (its rows wait to be accepted)
CHUNK = 256  # query rows scored at a time in a prompt's pass


class EvictingLayerKV(LayerKV):
    """A full-attention layer cache that holds only some positions: k, v [1, H_kv, slots, D] and each slot's
    position per KV head, pos [H_kv, slots] (heads may keep different old positions; the positions written
    since the last compression sit at the same slots in every head, in order). `offset` is one past the
    newest position."""

    observes = True

    def __init__(self, spec: LayerSpec, policy: EvictionPolicy):
        if spec.batch != 1:
            raise SkipjackError("a cache policy that evicts keys takes one sequence per cache")
        self.spec, self.policy, self.capacity = spec, policy, spec.capacity
        self.n = self.offset = 0  # slots held; one past the newest position
        self.holes = False  # whether a position below `offset` was evicted
        self.tail = 0  # the held slots from this position on are contiguous (written since the last eviction)
        self.k = self.v = self.pos = self.acc = None
        self._alloc(min(spec.capacity, 256))
        self.wq: torch.Tensor | None = None  # the last `window` accepted queries [H, W, D] (for scoring)
        self.wq_pos = torch.zeros(0, dtype=torch.long)  # [W] their positions
        self.pending: list[tuple] = []  # a small pass's rows: (position, query [H, D], slots [S_t], probs [H_kv, S_t])

    # ---- storage ----
    @torch.inference_mode(False)  # normal tensors even when a forward grows them: steps outside write them too
    def _alloc(self, size: int) -> None:
        H, D, n = self.spec.heads, self.spec.head_dim, self.n
        k = torch.zeros(1, H, size, D, dtype=self.spec.dtype)  # [1, H_kv, slots, D]
        v = torch.zeros(1, H, size, D, dtype=self.spec.dtype)  # [1, H_kv, slots, D]
        pos = torch.zeros(H, size, dtype=torch.long)  # [H_kv, slots]
        acc = torch.zeros(H, size) if self.policy.accumulates else None  # [H_kv, slots] summed attention
        if n:
            k[:, :, :n], v[:, :, :n], pos[:, :n] = self.k[:, :, :n], self.v[:, :, :n], self.pos[:, :n]
            if acc is not None:
                acc[:, :n] = self.acc[:, :n]
        self.k, self.v, self.pos, self.acc = k, v, pos, acc

    def _first(self) -> int:  # the position at slot 0 of the contiguous tail (what `span` and `keep` address)
        return self.offset - self.n

    def _slots_below(self, position: int) -> int:
        """Held slots with positions below `position` (a position in the recent tail or past it)."""
        return max(0, self.n - max(0, self.offset - position))

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int):
        T = k.shape[2]
        if start > self.offset or start < self.tail:
            raise SkipjackError(f"cannot write position {start}: this cache layer holds up to {self.offset}")
        self._commit(start)
        self.n, self.offset = self._slots_below(start), start
        end = start + T
        if end > self.capacity:
            raise SkipjackError(f"context length {end} exceeds the cache capacity {self.capacity}")
        if self.n + T > self.k.shape[2]:
            self._alloc(min(self.capacity, self.n + T + max(GROW, self.k.shape[2] // 4)))
        n = self.n
        self.k[:, :, n : n + T], self.v[:, :, n : n + T] = k, v
        self.pos[:, n : n + T] = torch.arange(start, end)
        if self.acc is not None:
            self.acc[:, n : n + T] = 0
        self.n, self.offset = n + T, end
        past = self.pos[0, :n] if self.holes else range(0, start)  # a view, read by this pass's mask only
        return self.k[:, :, : n + T], self.v[:, :, : n + T], past  # [1, H_kv, n + T, D] x2

    def span(self, lo: int, hi: int) -> tuple:
        if lo < self.tail:
            raise SkipjackError(f"positions [{lo}, {hi}) are not all held by cache layer (keys were evicted)")
        return super().span(lo, hi)

    def trim(self, n: int) -> int:
        n = min(self.offset - self.tail, n)
        self.n -= n
        self.offset -= n
        self.pending = [r for r in self.pending if r[0] < self.offset]
        return n

    def keep(self, start: int, idx: list[int]) -> None:
        s0, n = start - self._first(), self.n
        src = s0 + torch.tensor(idx, dtype=torch.long)  # [m] kept slots, in their new order
        dst = slice(s0, s0 + len(idx))
        self.k[:, :, dst] = self.k.index_select(2, src)
        self.v[:, :, dst] = self.v.index_select(2, src)
        if self.acc is not None:
            self.acc[:, dst] = self.acc.index_select(1, src)
        self.pos[:, dst] = torch.arange(start, start + len(idx))
        self.n, self.offset = s0 + len(idx), start + len(idx)
        moved = torch.full((n,), -1, dtype=torch.long)  # old slot -> new slot (-1: gone)
        moved[:s0] = torch.arange(s0)
        moved[src] = torch.arange(s0, s0 + len(idx))
        rows = []
        for p, q, slots, probs in self.pending:  # a kept row moves with its token; its keys move too
            if p < start or int(moved[p - start + s0]) >= 0:
                new = moved[slots]
                cols = new >= 0
                p = p if p < start else start + int(moved[p - start + s0]) - s0
                rows.append((p, q, new[cols], None if probs is None else probs[:, cols]))
        self.pending = rows

    def resumable(self, n: int) -> bool:
        return not self.holes and n <= self.offset

    def moved(self, fresh: LayerKV) -> LayerKV:
        self.capacity = fresh.capacity  # grows on demand
        return self

    def stored(self):
        if self.holes:
            raise SkipjackError("a cache with evicted keys cannot be saved (run without --kv, or --kv full)")
        return self.k[:, :, : self.n], self.v[:, :, : self.n], 0

    def restore(self, k, v, first) -> None:
        raise SkipjackError("a saved cache cannot be loaded into a cache policy that evicts keys")

    @property
    def nbytes(self) -> int:
        return 2 * self.n * self.k[:, :, :1].numel() * self.k.element_size()

    @property
    def allocated(self) -> int:
        """Bytes of the key/value tensors as allocated (held slots and free ones)."""
        return 2 * self.k.numel() * self.k.element_size()

    # ---- queries and scores ----
    def observe(self, q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor | None, scale: float) -> None:
        """This pass's queries q [1, T, H, D] (rotated) over keys [1, H_kv, S, D] with `visible` [T, S] (None:
        all keys for one row, causal over the new ones for more). A prompt's pass counts at once; a small pass's
        rows wait until they are accepted (`_commit`)."""
        T, S = q.shape[1], keys.shape[2]
        start = self.offset - T
        if T > SMALL:  # a prompt's pass: never rolled back
            self._commit(start)
            if self.acc is not None:
                for a in range(0, T, CHUNK):
                    rows = q[0, a : a + CHUNK].transpose(0, 1)  # [H, c, D]
                    vis = self._visible(visible, a, rows.shape[1], S, T)  # [c, S]
                    probs = self._probs(rows, keys[0], vis, scale)  # [H_kv, c, S]
                    self.acc[:, :S] += probs.sum(1)
            w = min(T, self.policy.window)
            self._keep_queries(q[0, T - w :].transpose(0, 1), torch.arange(self.offset - w, self.offset))
            return
        for t in range(T):
            vis = self._visible(visible, t, 1, S, T)[0]  # [S]
            slots = vis.nonzero()[:, 0]  # [S_t] the keys this row sees, in slot order
            row = q[0, t]  # [H, D]
            probs = None
            if self.acc is not None:  # scored alone, over its own keys: as the plain step that would run it
                probs = self._probs(row[:, None], keys[0].index_select(1, slots), None, scale)[:, 0]  # [H_kv, S_t]
            self.pending.append((start + t, row, slots, probs))

    @staticmethod
    def _visible(visible, a: int, c: int, S: int, T: int) -> torch.Tensor:
        """Rows [a, a + c) of the pass's visibility [c, S] (past keys, then the T new ones)."""
        if visible is not None:
            return visible[a : a + c]
        rows = torch.arange(a, a + c)[:, None] + (S - T)  # [c, 1] each row's own slot
        return torch.arange(S)[None, :] <= rows  # [c, S] causal (all past keys visible)

    def _probs(self, q: torch.Tensor, keys: torch.Tensor, vis: torch.Tensor | None, scale: float) -> torch.Tensor:
        """Attention probabilities summed over each KV head's query heads: q [H, c, D] over keys [H_kv, S, D]
        -> [H_kv, c, S] (fp32)."""
        H, c, D = q.shape
        Hk = keys.shape[0]
        logits = (q.float().view(Hk, H // Hk, c, D) @ keys.float().transpose(1, 2)[:, None]) * scale  # [H_kv, G, c, S]
        if vis is not None:
            logits = logits.masked_fill(~vis, float("-inf"))
        return logits.softmax(-1).sum(1)  # [H_kv, c, S]

    def _commit(self, upto: int) -> None:
        """Rows of earlier small passes at positions below `upto` were accepted: count them; drop the rest."""
        done = [r for r in self.pending if r[0] < upto]
        self.pending = []
        if not done:
            return
        done.sort(key=lambda r: r[0])
        if self.acc is not None:
            for _, _, slots, probs in done:
                self.acc[:, slots] += probs
        self._keep_queries(torch.stack([r[1] for r in done], 1), torch.tensor([r[0] for r in done]))

    def _keep_queries(self, q: torch.Tensor, positions: torch.Tensor) -> None:
        """Keep the last `window` accepted queries q [H, c, D] at positions [c]."""
        W = self.policy.window
        if W == 0:
            return
        self.wq = q[:, -W:] if self.wq is None else torch.cat([self.wq, q], 1)[:, -W:]  # [H, <=W, D]
        self.wq_pos = torch.cat([self.wq_pos, positions])[-W:]

    def window_attention(self, scale: float) -> torch.Tensor:
        """The kept window queries' attention over the held keys [H_kv, G, W, n] (fp32; each query sees the
        held keys at or before its position)."""
        self._commit(self.offset)
        H, W, D = self.wq.shape
        Hk, n = self.spec.heads, self.n
        logits = (self.wq.float().view(Hk, H // Hk, W, D) @ self.k[0, :, :n].float().transpose(1, 2)[:, None]) * scale
        seen = self.pos[:, None, None, :n] <= self.wq_pos[None, None, :, None]  # [H_kv, 1, W, n]
        # a query older than every held key (evicted before it, at a small budget) votes for nothing
        return logits.masked_fill(~seen, float("-inf")).softmax(-1).nan_to_num(0.0)  # [H_kv, G, W, n]

    # ---- eviction ----
    def evict_to(self, keep: int, scores: torch.Tensor, recent: int) -> None:
        """Keep `keep` slots per KV head: the last `recent` slots, and the best of the rest by scores
        [H_kv, n]; the kept keys move to new, smaller tensors."""
        n = self.n
        if keep >= n:
            return
        recent = min(recent, keep)
        old = scores[:, : n - recent]  # [H_kv, n - recent]
        top = old.topk(keep - recent, dim=1).indices.sort(dim=1).values  # [H_kv, keep - recent]
        idx = torch.cat([top, torch.arange(n - recent, n).expand(old.shape[0], recent)], 1)  # [H_kv, keep]
        self._gather(idx)

    @torch.inference_mode(False)
    def _gather(self, idx: torch.Tensor) -> None:
        """Hold only slots idx [H_kv, keep] (sorted per head), in fresh tensors with room to grow."""
        H, keep = idx.shape
        size = min(self.capacity, keep + GROW)
        g = idx[None, :, :, None].expand(1, H, keep, self.spec.head_dim)  # [1, H_kv, keep, D]
        k = torch.zeros(1, H, size, self.spec.head_dim, dtype=self.spec.dtype)  # [1, H_kv, size, D]
        v = torch.zeros(1, H, size, self.spec.head_dim, dtype=self.spec.dtype)  # [1, H_kv, size, D]
        k[:, :, :keep], v[:, :, :keep] = self.k.gather(2, g), self.v.gather(2, g)
        pos = torch.zeros(H, size, dtype=torch.long)
        pos[:, :keep] = self.pos.gather(1, idx)
        if self.acc is not None:
            acc = torch.zeros(H, size)
            acc[:, :keep] = self.acc.gather(1, idx)
            self.acc = acc
        self.k, self.v, self.pos, self.n = k, v, pos, keep
        self.holes = self.holes or keep < self.offset
        run = pos[:, :keep] == torch.arange(self.offset - keep, self.offset)  # [H_kv, keep] where slots are contiguous
        gap = (~run.all(0)).nonzero()  # slots that break the tail in some head
        self.tail = self.offset - keep + (int(gap[-1]) + 1 if len(gap) else 0)


class EvictionPolicy(CachePolicy):
    """Base of the evicting policies. `budget`: the kept fraction of the context (0 < budget <= 1; 1 keeps
    every key); `window`: the most recent positions, always kept, whose queries score the rest; `every`: also
    compress during decoding, each time the context reaches a multiple of `every` past the prompt (0: only
    after the prompt); `chunk`: run a long prompt in passes of this many tokens, compressing after each (the
    memory a prompt needs is then bounded by the budget, not by the prompt: CAKE's cascade, kvpress's chunked
    prefill; 0: one pass, compressed once)."""

    lossless = False
    holds_every_key = False  # evicted keys are gone; the kept ones move to new slots
    accumulates = False  # whether layers sum every accepted query's attention (`EvictingLayerKV.acc`)

    def __init__(self, budget: float = 0.25, window: int = 32, every: int = 0, chunk: int = 0):
        self.budget = validate.number("budget (the kept fraction of the context)", budget, 0.0, 1.0, lo_open=True)
        self.window = validate.integer("window", window, 1, 4096)
        self.every = validate.integer("every", every, 0, 1 << 20)
        self.chunk = validate.integer("chunk", chunk, 0, 1 << 20)
        if 0 < self.chunk < 2 * self.window:
            raise SkipjackError(f"chunk must be 0 or at least twice the window ({2 * self.window}; got {chunk})")

    def layer(self, spec: LayerSpec) -> LayerKV:
        if spec.window is not None:
            return FullKV().layer(spec)
        return EvictingLayerKV(spec, self)

    def prompt_chunk(self) -> int:
        """Tokens per prompt pass (0: the whole prompt at once; so too when nothing will be evicted)."""
        return self.chunk if self.budget < 1.0 else 0

    # ---- the decode loop's questions (`CachePolicy`'s hooks, through KVCache.settle / KVCache.room) ----
    def settle(self, cache: KVCache) -> None:
        """A step (or the prompt) is settled: compress if the context reached a compression point."""
        state = cache.state
        if "next" not in state:  # the prompt
            state["next"] = cache.offset + self.every if self.every else None
        elif state["next"] is None or cache.offset < state["next"]:
            return
        else:
            state["next"] += self.every
        self.compress(cache)
        if state["next"] is None:  # no compression will come: stop watching queries
            for layer in cache:
                if isinstance(layer, EvictingLayerKV):
                    layer.observes, layer.wq, layer.pending = False, None, []

    def room(self, cache: KVCache) -> int:
        """Positions a step may write before the next compression point (a draft must not cross it)."""
        nxt = cache.state.get("next")
        return cache.capacity if nxt is None else max(1, nxt - cache.offset)

    # ---- compression ----
    def compress(self, cache: KVCache) -> None:
        layers = [layer for layer in cache if isinstance(layer, EvictingLayerKV)]
        if not layers or self.budget >= 1.0:
            return
        keep = max(1, math.ceil(self.budget * cache.offset))
        scale = cache.scale
        for layer, b in zip(layers, self.allocate(layers, keep, scale)):
            b = max(1, min(layer.n, b))
            if b < layer.n:
                layer.evict_to(b, self.scores(layer, scale), self.recent(b))

    def recent(self, keep: int) -> int:
        """How many of a layer's `keep` slots go to the most recent positions, whatever their scores."""
        return min(self.window, keep)

    def allocate(self, layers: list[EvictingLayerKV], keep: int, scale: float) -> list[int]:
        """Per-layer budgets (slots) with mean `keep`."""
        return [keep] * len(layers)

    def scores(self, layer: EvictingLayerKV, scale: float) -> torch.Tensor:
        """Each held slot's score [H_kv, n] (higher is kept)."""
        raise NotImplementedError


def pooled(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Average pooling along the last axis, stride 1, same length (SnapKV's clustering of neighbours): [H, n]."""
    if kernel <= 1:
        return x
    out = torch.nn.functional.avg_pool1d(x[None], kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    return out[0][..., : x.shape[-1]]
