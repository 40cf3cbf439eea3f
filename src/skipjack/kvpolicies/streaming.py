"""StreamingLLM (Xiao et al. 2024): attention sinks plus a rolling window of recent tokens.

After the prompt, each layer keeps its first `sinks` positions and the last `budget` × the prompt minus the
sinks, and from then on every query attends to the sinks and to the window of positions before it (a mask by
position: a verify pass sees what plain steps would, so speculation on top stays exact). Positions that no
query can see any more are evicted as decoding goes (in batches of a few, so the tensors are not copied every
step). Keys keep their original positions (rotated when written), as kvpress and HF's SinkCache without
re-rotation do; the paper re-rotates keys to their cache slots, which matters only past the trained context,
and skipjack never runs past it.
"""

from __future__ import annotations

import math

import torch

from skipjack import validate
from skipjack.cache import KVCache
from skipjack.kvpolicies.base import GROW, EvictingLayerKV, EvictionPolicy


class StreamingLLM(EvictionPolicy):
    def __init__(self, budget: float = 0.25, sinks: int = 4):
        super().__init__(budget, 1, 0)
        self.window = 0  # no queries kept: nothing is scored
        self.sinks = validate.integer("sinks", sinks, 0, 1024)

    def layer(self, spec):
        layer = super().layer(spec)
        if isinstance(layer, EvictingLayerKV):
            layer.observes = False
        return layer

    def settle(self, cache: KVCache) -> None:
        layers = [layer for layer in cache if isinstance(layer, EvictingLayerKV)]
        if not layers or self.budget >= 1.0:
            return
        if "span" not in cache.state:  # the prompt: the window's size is fixed now
            self.fix(cache, max(1, math.ceil(self.budget * cache.offset) - self.sinks))
        span = cache.state["span"]
        for layer in layers:
            recent = max(0, min(span - 1, layer.offset - self.sinks))  # the next query sees (offset - span, offset]
            stale = layer.n - min(layer.n, self.sinks) - recent  # held slots no query will see again
            if stale > (GROW if layer.holes else 0):
                tail = torch.arange(layer.n - recent, layer.n)
                idx = torch.cat([torch.arange(min(self.sinks, layer.n)), tail])  # [sinks + span - 1]
                layer._gather(idx.expand(layer.spec.heads, -1).contiguous())

    def fix(self, cache: KVCache, span: int) -> None:
        """From now on each query sees the sinks and the `span` positions up to its own."""
        cache.state["span"] = span
        for layer in cache:
            if isinstance(layer, EvictingLayerKV):
                layer.sight = (span, self.sinks)

    def room(self, cache: KVCache) -> int:
        return cache.capacity
