"""Draft sizing from a measured cost model, calibrated online.

On a CPU, verifying n tokens in one forward is not free (ANCHORS: 8 tokens cost 2.8-3.5x one with plain
matmuls; with prepacked oneDNN weights it is much flatter). c(n) is the cost of a forward over n new tokens
relative to c(1). For each step the engine verifies the number of draft nodes n that maximises

    expected tokens per unit cost = (1 + sum_{i<n} s_i) / c(n + 1)

where s_i is the drafter's estimate that node i is accepted (its path probability; nodes are listed
parents-first, so the expected accepted length of a prefix is the sum of its nodes' scores, and the 1 is
the bonus token). n = 0 means a plain decoding step.

Where c(n) comes from:
1. A prior, measured once per model: rounds of forwards at every width over a cache of `context` tokens;
   within each round every width's time is divided by the width-1 time of the same round (so a shared
   machine's slow spells cancel), and the per-width median over rounds is kept.
2. Online calibration: the decode loop reports the wall time of every forward it runs (`observe`). Per
   width we keep an exponential moving average of the time; at observed widths c(n) becomes the observed
   ratio to the width-1 average, shrunk towards the prior by the number of observations, and between them
   the prior is scaled by the interpolated correction. This captures what the prior
   cannot: tree masks, KV compaction, longer contexts, the machine's state now. The table is rebuilt every
   `REFRESH` observations and kept non-decreasing.
"""

from __future__ import annotations

import statistics
import time

import torch

WIDTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
MAX_WIDTH = 66  # widths the table covers (MAX_DRAFT + root + one spare)
REFRESH = 8  # observations between table rebuilds
PRIOR_WEIGHT = 4.0  # the prior counts as this many observations
DECAY = 0.1  # EMA weight of a new observation


class CostModel:
    def __init__(self, widths: tuple[int, ...], rel: tuple[float, ...], learn: bool = False):
        self.widths, self.rel, self.learn = tuple(widths), tuple(rel), learn
        self.ema: dict[int, float] = {}  # width -> EMA of observed seconds
        self.count: dict[int, int] = {}  # width -> observations
        self.pending = 0
        self._rebuild()

    @classmethod
    def flat(cls) -> CostModel:
        """Every width costs the same and nothing is learned (tests; 'always draft the maximum')."""
        return cls((1, 1024), (1.0, 1.0))

    @classmethod
    def measure(cls, model, widths=WIDTHS, context: int = 256, rounds: int = 5) -> CostModel:
        """The prior: per-width median over `rounds` of (time of a w-token forward / time of a 1-token one)."""
        limit = model.config.max_position_embeddings
        widths = tuple(w for w in widths if w <= limit // 2) or (1,)
        context = max(1, min(context, limit - max(widths) - 1))
        cache = model.make_cache(context + max(widths) + 1)
        model(torch.zeros(1, context, dtype=torch.long), cache, logits="none")
        ratios: list[list[float]] = [[] for _ in widths]
        for r in range(rounds + 1):  # round 0 is warm-up
            times = []
            for w in widths:
                x = torch.zeros(1, w, dtype=torch.long)
                t = time.perf_counter()
                model(x, cache, logits="all")
                times.append(time.perf_counter() - t)
                cache.trim(w)
            if r:
                for i, t in enumerate(times):
                    ratios[i].append(t / times[0])
        return cls(widths, tuple(statistics.median(x) for x in ratios), learn=True)

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

    def _rebuild(self) -> None:
        prior = [0.0] + [self._prior(n) / self._prior(1) for n in range(1, MAX_WIDTH + 1)]
        base, nb = self.ema.get(1), self.count.get(1, 0)
        known: list[tuple[int, float]] = []  # (width, observed / prior), blended with the prior by counts
        if base and nb >= 3:
            for n in sorted(self.count):
                k = min(self.count[n], nb)
                c = (k * self.ema[n] / base + PRIOR_WEIGHT * prior[n]) / (k + PRIOR_WEIGHT)
                known.append((n, c / prior[n]))
        table, run, j = [0.0], 0.0, 0
        for n in range(1, MAX_WIDTH + 1):
            f = 1.0
            if known:  # the correction factor, interpolated between observed widths, flat beyond them
                while j + 1 < len(known) and known[j + 1][0] <= n:
                    j += 1
                (n0, f0), (n1, f1) = known[j], known[min(j + 1, len(known) - 1)]
                f = f0 if n <= n0 or n1 == n0 else f0 + (f1 - f0) * (n - n0) / (n1 - n0)
            run = max(run, prior[n] * f)  # non-decreasing against noise
            table.append(run)
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
        old = self.ema.get(width)
        self.ema[width] = seconds if old is None else old + DECAY * (seconds - old)
        self.count[width] = self.count.get(width, 0) + 1
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
