"""H2O, the heavy-hitter oracle (Zhang et al. 2023): keep the keys that have drawn the most attention so far,
and the most recent ones.

Every accepted query's attention (summed over each KV head's query heads) is added to its keys' scores, the
prompt's queries included. At each compression point (after the prompt, then every `every` tokens of
decoding) each layer keeps `budget` × the context per KV head: half the most recent positions, half the
heaviest hitters among the rest.
"""

from __future__ import annotations

import torch

from skipjack.kvpolicies.base import EvictingLayerKV, EvictionPolicy


class H2O(EvictionPolicy):
    accumulates = True

    def __init__(self, budget: float = 0.25, every: int = 32, chunk: int = 0):
        super().__init__(budget, 1, every, chunk)
        self.window = 0  # no queries kept: the scores are sums

    def recent(self, keep: int) -> int:
        return max(1, keep // 2)

    def scores(self, layer: EvictingLayerKV, scale: float) -> torch.Tensor:
        layer._commit(layer.offset)
        return layer.acc[:, : layer.n]  # [H_kv, n]
