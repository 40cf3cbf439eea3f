"""SnapKV (Li et al. 2024): the prompt's last `window` queries vote for the keys worth keeping.

After the prompt (and, with `every`, at each decoding-time compression point): the window queries' attention
over the held keys (causal: each query sees the keys up to its own position), summed over the window and
averaged over each KV head's query heads, average-pooled along positions (`kernel`, clustering neighbours), gives
each key a score; per KV head the best `budget` - `window` keys are kept, and the window itself.
"""

from __future__ import annotations

import torch

from skipjack import validate
from skipjack.kvpolicies.base import EvictingLayerKV, EvictionPolicy, pooled


class SnapKV(EvictionPolicy):
    def __init__(self, budget: float = 0.25, window: int = 32, kernel: int = 5, every: int = 0, chunk: int = 0):
        super().__init__(budget, window, every, chunk)
        self.kernel = validate.integer("kernel", kernel, 1, 63)

    def scores(self, layer: EvictingLayerKV, scale: float) -> torch.Tensor:
        attn = layer.window_attention(scale)  # [H_kv, G, W, n]
        return pooled(attn.sum(2).mean(1), self.kernel)  # [H_kv, n]
