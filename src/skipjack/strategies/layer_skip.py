"""Unified Layer Skipping (Liu et al. 2024, "Accelerating Inference in Large Language Models with a Unified
Layer Skipping Strategy").

Given a target ratio R of layers to skip, skip round(R * L) layers spread evenly over the intermediate layers
(the first and the last layer always run), the same layers for every generated token, so the plan is known
before decoding and a batch shares it. Speedup ≈ 1 / (1 - R) on the layers' share of a step.

KV of the skipped layers: not needed. The prompt runs every layer; after it, a skipped layer never runs again
in this request, so no token ever reads keys it lacks (none are copied or recomputed). A conversation cannot
go on from such a cache (the skipped layers lack the generated tokens' keys): the next turn prefills afresh.
"""

from __future__ import annotations

from skipjack.errors import SkipjackError
from skipjack.strategies.base import Strategy, fraction


def spread(k: int, lo: int, hi: int) -> list[int]:
    """`k` indices spread evenly over [lo, hi): the middle of each of k equal parts."""
    n = hi - lo
    return [lo + int((j + 0.5) * n / k) for j in range(k)] if k else []


class LayerSkip(Strategy):
    name = "layer-skip"

    def __init__(self, ratio: float = 0.25):
        self.ratio = fraction(self.name, "ratio", ratio)

    def begin(self, model, prompt_len: int, max_new: int) -> None:
        super().begin(model, prompt_len, max_new)
        L = model.num_layers
        k = round(self.ratio * L)
        if k > L - 2:
            raise SkipjackError(
                f"layer-skip: ratio {self.ratio} skips {k} of {L} layers; at most {L - 2} (the first and last "
                f"layers always run): use ratio <= {(L - 2) / L:.2f}"
            )
        self.skipped = spread(k, 1, L - 1)
        self.keep = [i for i in range(L) if i not in set(self.skipped)]

    def forward(self, model, ids, cache, index: int):
        self.count(ids.shape[1], len(self.keep), 0)
        return model(ids, cache, layers=self.keep)

    def keeps_cache_whole(self) -> bool:
        return not self.skipped

    def stats(self) -> dict:
        return super().stats() | {"skipped_layers": self.skipped}
