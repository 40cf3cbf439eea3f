"""PyramidKV (Cai et al. 2024): SnapKV's scores with per-layer budgets falling from the bottom layer to the top.

Attention funnels: lower layers spread it over many keys, upper ones focus on few. With a mean budget b
(slots per layer), the top layer gets b / `beta`, the bottom one 2b - b / `beta`, and the layers between fall
linearly (the PyramidKV repository's allocation, beta = 20).
"""

from __future__ import annotations

from skipjack import validate
from skipjack.kvpolicies.base import EvictingLayerKV
from skipjack.kvpolicies.snapkv import SnapKV


class PyramidKV(SnapKV):
    def __init__(
        self,
        budget: float = 0.25,
        window: int = 32,
        kernel: int = 5,
        beta: float = 20.0,
        every: int = 0,
        chunk: int = 0,
    ):
        super().__init__(budget, window, kernel, every, chunk)
        self.beta = validate.number("beta", beta, 1.0, 1000.0)

    def allocate(self, layers: list[EvictingLayerKV], keep: int, scale: float) -> list[int]:
        L = len(layers)
        if L == 1:
            return [keep]
        top = keep / self.beta
        bottom = 2 * keep - top
        return [max(1, round(bottom - (bottom - top) * i / (L - 1))) for i in range(L)]
