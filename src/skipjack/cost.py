"""Draft sizing from a measured cost model.

On a CPU, verifying n tokens in one forward is not free (ANCHORS: 8 tokens cost 2.8-3.5x one with plain
matmuls; with prepacked oneDNN weights it is much flatter). We time the model's forward at a few widths
once, giving c(n) relative to c(1), and for each step choose the number of draft nodes n that maximises

    expected tokens per unit cost = (1 + sum_{i<n} s_i) / c(n + 1)

where s_i is the drafter's estimate that node i is accepted (its path probability; nodes are listed
parents-first, so the expected accepted length of a prefix is the sum of its nodes' scores, and the 1 is
the bonus token). n = 0 means a plain decoding step.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch

WIDTHS = (1, 2, 4, 8, 12, 16, 24, 32)


@dataclass(frozen=True)
class CostModel:
    widths: tuple[int, ...]
    rel: tuple[float, ...]  # c(width) / c(1), non-decreasing

    @classmethod
    def flat(cls) -> CostModel:
        """Every width costs the same (useful in tests and for 'always draft the maximum')."""
        return cls((1, 1024), (1.0, 1.0))

    @classmethod
    def measure(cls, model, widths=WIDTHS, context: int = 128, reps: int = 3) -> CostModel:
        """Median time of a forward of `w` new tokens over a `context`-token cache, for each width."""
        limit = model.config.max_position_embeddings
        widths = tuple(w for w in widths if w <= limit // 2) or (1,)
        context = max(1, min(context, limit - max(widths) - 1))
        cache = model.make_cache(context + max(widths) + 1)
        ids = torch.zeros(1, context, dtype=torch.long)
        model(ids, cache, logits="none")
        times = []
        for w in widths:
            x = torch.zeros(1, w, dtype=torch.long)
            samples = []
            for _ in range(reps + 1):  # first run is warm-up
                t = time.perf_counter()
                model(x, cache, logits="all")
                samples.append(time.perf_counter() - t)
                cache.trim(w)
            times.append(sorted(samples[1:])[len(samples[1:]) // 2])
        rel = [t / times[0] for t in times]
        for i in range(1, len(rel)):  # enforce monotonicity against timing noise
            rel[i] = max(rel[i], rel[i - 1])
        return cls(tuple(widths), tuple(rel))

    def cost(self, n: int) -> float:
        """Relative cost of verifying n tokens (linear interpolation, linear extrapolation beyond)."""
        w, r = self.widths, self.rel
        if n <= w[0]:
            return r[0]
        for i in range(1, len(w)):
            if n <= w[i]:
                f = (n - w[i - 1]) / (w[i] - w[i - 1])
                return r[i - 1] + f * (r[i] - r[i - 1])
        slope = (r[-1] - r[-2]) / (w[-1] - w[-2]) if len(w) > 1 else 0.0
        return r[-1] + slope * (n - w[-1])

    def best_size(self, scores: list[float]) -> int:
        """Number of leading nodes to verify (0 = plain step)."""
        best_n, best_v, acc = 0, 1.0 / self.cost(1), 1.0
        for n, s in enumerate(scores, start=1):
            acc += s
            v = acc / self.cost(n + 1)
            if v > best_v:
                best_n, best_v = n, v
        return best_n

    @functools.cache  # noqa: B019 - a handful of cost models per process
    def max_useful(self, cap: int = 64) -> int:
        """Largest draft worth asking for: beyond it even certain acceptance would not pay."""
        n = 1
        while n < cap and (n + 2) / self.cost(n + 2) > 1.0 / self.cost(1):
            n += 1
        return n
