"""Draft sizing from a measured cost model, calibrated online.

On a CPU, verifying n tokens in one forward is not free (ANCHORS: 8 tokens cost 2.8-3.5x one with plain
matmuls; with prepacked oneDNN weights it is much flatter). c(n) is the cost of a forward over n new tokens
relative to c(1). For each step the engine verifies the number of draft nodes n that maximises

    expected tokens per unit cost = (1 + sum_{i<n} s_i) / c(n + 1)

where s_i is the drafter's estimate that node i is accepted (its path probability; nodes are listed
parents-first, so the expected accepted length of a prefix is the sum of its nodes' scores, and the 1 is
the bonus token). n = 0 means a plain decoding step.

Where c(n) comes from:
1. A prior, measured once per model: interleaved rounds of forwards at every width over a cache of
   `context` tokens; c(w) = fastest w-token forward / fastest 1-token forward (on a shared machine the
   fastest run is the least disturbed one).
   The measured ratios get a least-squares non-decreasing fit (noise at small widths averages out rather
   than ratcheting the whole curve up into a plateau that would make every extra node look free).
2. Online calibration: the decode loop reports the wall time of every forward it runs (`observe`). It keeps
   an exponential moving average (EMA) of a plain step's time t1, and of the observed c(w) = seconds / t1
   per knot of the prior (each width pools into the smallest knot >= it, so a few knots gather many
   observations). A knot's value is its EMA shrunk towards the prior by its count; a knot never observed
   gets the prior plus the average gap every verify step has shown over the prior (tree mask, KV
   compaction, longer contexts, the machine's state now). The knots get the same weighted non-decreasing
   fit, the table interpolates between them, and it is rebuilt every `REFRESH` observations.
"""

from __future__ import annotations

import time

import torch

WIDTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
MAX_WIDTH = 66  # widths the table covers (MAX_DRAFT + root + one spare)
REFRESH = 8  # observations between table rebuilds
PRIOR_WEIGHT = 4.0  # the prior counts as this many observations
DECAY = 0.05  # EMA weight of a new observation


class CostModel:
    def __init__(self, widths: tuple[int, ...], rel: tuple[float, ...], learn: bool = False):
        self.widths, self.rel, self.learn = tuple(widths), tuple(_isotonic(list(rel))), learn
        self.t1, self.n1 = 0.0, 0  # EMA of a plain (width-1) step's seconds, and how many were seen
        self.obs: dict[int, float] = {}  # knot -> EMA of observed c(w) = seconds / t1 for widths pooled there
        self.count: dict[int, int] = {}  # knot -> observations
        self.extra, self.n_extra = 0.0, 0  # EMA of (observed c(w) - prior c(w)) over all verify steps
        self.pending = 0
        self._rebuild()

    @classmethod
    def flat(cls) -> CostModel:
        """Every width costs the same and nothing is learned (tests; 'always draft the maximum')."""
        return cls((1, 1024), (1.0, 1.0))

    @classmethod
    def measure(cls, model, widths=WIDTHS, context: int = 256, rounds: int = 5) -> CostModel:
        """The prior: per width, the fastest of `rounds` forwards over the fastest one-token forward (the
        fastest run is the one a shared machine disturbed least; rounds interleave the widths)."""
        limit = model.config.max_position_embeddings
        widths = tuple(w for w in widths if w <= limit // 2) or (1,)
        context = max(1, min(context, limit - max(widths) - 1))
        cache = model.make_cache(context + max(widths) + 1)
        model(torch.zeros(1, context, dtype=torch.long), cache, logits="none")
        best = [float("inf")] * len(widths)
        for r in range(rounds + 1):  # round 0 is warm-up
            for i, w in enumerate(widths):
                x = torch.zeros(1, w, dtype=torch.long)
                t = time.perf_counter()
                model(x, cache, logits="all")
                if r:
                    best[i] = min(best[i], time.perf_counter() - t)
                cache.trim(w)
        return cls(widths, tuple(t / best[0] for t in best), learn=True)

    def _prior(self, n: int) -> float:
        """Prior relative cost of n tokens (linear interpolation, linear extrapolation beyond)."""
        w, r = self.widths, self.rel
        if n <= w[0]:
            return r[0]
        for i in range(1, len(w)):
            if n <= w[i]:
                f = (n - w[i - 1]) / (w[i] - w[i - 1])
                return r[i - 1] + f * (r[i] - r[i - 1])
        slope = (r[-1] - r[-2]) / (w[-1] - w[-2]) if len(w) > 1 else 0.0
        return r[-1] + slope * (n - w[-1])

    def _knot(self, n: int) -> int:
        """The prior's smallest width >= n (the last one beyond them): observations pool per knot."""
        return next((w for w in self.widths if w >= n), self.widths[-1])

    def _rebuild(self) -> None:
        base, shift = self.rel[0], self.extra * self.n_extra / (self.n_extra + PRIOR_WEIGHT)
        vals, weights = [], []
        for w, r in zip(self.widths, self.rel):
            prior, k = r / base, self.count.get(w, 0)
            if w == 1:
                vals.append(1.0)
                weights.append(1e9)  # c(1) = 1 by definition
            elif k:  # observed: the EMA, shrunk towards the prior
                vals.append((k * self.obs[w] + PRIOR_WEIGHT * prior) / (k + PRIOR_WEIGHT))
                weights.append(k + PRIOR_WEIGHT)
            else:  # unobserved: the prior plus the overhead every verify step has shown
                vals.append(max(1.0, prior + shift))
                weights.append(PRIOR_WEIGHT)
        knots = _isotonic(vals, weights)
        w, table, i = self.widths, [0.0], 0
        for n in range(1, MAX_WIDTH + 1):
            while i + 1 < len(w) and w[i + 1] < n:
                i += 1
            if len(w) == 1 or n <= w[0]:
                c = knots[0]
            elif n > w[-1]:
                slope = (knots[-1] - knots[-2]) / (w[-1] - w[-2])
                c = knots[-1] + slope * (n - w[-1])
            else:
                c = knots[i] + (knots[i + 1] - knots[i]) * (n - w[i]) / (w[i + 1] - w[i])
            table.append(max(c, table[-1], 1.0))
        self.table = table
        n = 1
        while n < MAX_WIDTH - 2 and (n + 2) / self.cost(n + 2) > 1.0 / self.cost(1):
            n += 1
        self._max_useful = n
        self.pending = 0

    def cost(self, n: int) -> float:
        """Relative cost of verifying n tokens in one forward (c(1) = 1)."""
        if n <= MAX_WIDTH:
            return self.table[max(n, 1)]
        return self.table[-1] * n / MAX_WIDTH

    def observe(self, width: int, seconds: float) -> None:
        """The decode loop ran a forward over `width` new tokens in `seconds` of wall time."""
        if not self.learn or not 1 <= width <= MAX_WIDTH:
            return
        if width == 1:
            self.t1 = seconds if not self.n1 else self.t1 + DECAY * (seconds - self.t1)
            self.n1 += 1
            return
        if self.n1 < 3:
            return  # no plain step to compare with yet
        c = seconds / self.t1
        d = c - self._prior(width) / self._prior(1)
        self.extra = d if not self.n_extra else self.extra + DECAY * (d - self.extra)
        self.n_extra += 1
        k = self._knot(width)
        self.obs[k] = c if k not in self.obs else self.obs[k] + DECAY * (c - self.obs[k])
        self.count[k] = self.count.get(k, 0) + 1
        self.pending += 1
        if self.pending >= REFRESH:
            self._rebuild()

    def best_size(self, scores: list[float]) -> int:
        """Number of leading nodes to verify (0 = plain step)."""
        best_n, best_v, acc = 0, 1.0 / self.cost(1), 1.0
        for n, s in enumerate(scores, start=1):
            acc += s
            v = acc / self.cost(n + 1)
            if v > best_v:
                best_n, best_v = n, v
        return best_n

    def max_useful(self, cap: int = 64) -> int:
        """Largest draft worth asking for: beyond it even certain acceptance would not pay."""
        return min(cap, self._max_useful)


def _isotonic(y: list[float], w: list[float] | None = None) -> list[float]:
    """Weighted least-squares non-decreasing fit (pool adjacent violators): timing noise is averaged out,
    not ratcheted up into a plateau that would make every extra node look free."""
    blocks: list[list[float]] = []  # [weighted sum, weight, count]
    for v, wt in zip(y, w or [1.0] * len(y)):
        blocks.append([v * wt, wt, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, wt2, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += wt2
            blocks[-1][2] += c
    return [s / wt for s, wt, c in blocks for _ in range(c)]
