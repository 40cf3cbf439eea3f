"""Draft sizing from a measured cost model, calibrated online per context length.

On a CPU, verifying n tokens in one forward is not free, and how much more it costs than one token depends
on the kernels, the machine and the context (BENCHMARKS.md, "Verify cost"). c(n | L) is the cost of a forward over n new
tokens at a context of L cached tokens, relative to one token at the same context. For each step the engine
verifies the number of draft nodes n that maximises

    expected tokens per unit cost = (1 + sum_{i<n} s_i) / c(n + 1 | L)

where s_i is the drafter's estimate that node i is accepted (its path probability; nodes are listed
parents-first, so the expected accepted length of a prefix is the sum of its nodes' scores, and the 1 is
the bonus token). n = 0 means a plain decoding step. c is taken non-decreasing in n (a running maximum), so
a dip in the table never makes a useless node look worth verifying.

The context matters: attention over the cache grows with the number of queries, the weights' cost does not,
so a wide verify step at a long context costs more, relative to a plain step there, than at a short one (the
bench reports the curves learned during its run, per context: BENCHMARKS.md, "Verify cost"). So costs are
kept per context bucket (L <= 512, then doubling: 1024, 2048, ...).

Where c(n | L) comes from:
1. A prior, measured once per model (and machine: it is cached on disk, see `skipjack.decoding.tuning`):
   interleaved rounds of forwards at every width, at L = PRIOR_CONTEXT and again at L = LONG_CONTEXT; each
   width's time is taken as a line in L through the two (its slope is mostly the attention over the
   cache), so the prior c(w | L) exists at every context. c(w) = fastest w-token forward / fastest 1-token
   forward (on a shared machine the fastest run is the least disturbed one), with a least-squares
   non-decreasing fit (noise averages out rather than ratcheting the curve up into a plateau that would
   make every extra node look free).
2. Online calibration: the decode loop reports every forward's width, context and wall time (`observe`).
   - The plain-step time t1(L) = a * (1 + beta * L) * r_b: `a` is an exponential moving average (EMA) over
     every plain step (it follows the machine's state), beta is the bytes of KV per cached token over the
     weights' bytes (a plain step streams both), r_b an EMA per bucket of how far the bucket's plain steps
     sit from that line (a bucket without plain steps borrows the nearest shorter bucket's).
   - Each verify step gives c = seconds / t1(L), pooled per (bucket, knot of the prior): a width pools into
     the smallest knot >= it. What is learned is the gap between the observed c and the measured prior
     at the step's own context; a knot's gap is its EMA shrunk towards the shorter bucket's fitted gap
     (the machine's state carries over, the shape in the context comes from the measurement). The cost
     used for a step is the measured prior at that step's context plus its bucket's gap. A knot the bucket
     has not observed gets the gap interpolated linearly in width between the observed knots around it (no
     gap at c(1) = 1), and beyond the widest observed knot, the gap seen there. (A constant shift learned
     from wide drafts alone would make the narrow ones look as dear, and at long contexts flatten the curve
     so that every node up to the widest looks free.) Knots get a weighted non-decreasing fit at the
     bucket's typical context; the gaps are interpolated between knots and rebuilt every `REFRESH`
     observations, or at once when a knot is first observed.
   - The first `EXPLORE` steps in a bucket beyond the first are plain steps, so that t1 is measured there
     rather than guessed.
"""

from __future__ import annotations

import math
import time

import torch

from skipjack.limits import MAX_DRAFT

WIDTHS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
MAX_WIDTH = MAX_DRAFT + 2  # widths the table covers (the drafts, the root, and one spare)
REFRESH = 8  # observations between table rebuilds
PRIOR_WEIGHT = 4.0  # the prior counts as this many observations
DECAY = 0.05  # EMA weight of a new observation
BUCKETS = 8  # context buckets: <= 512, <= 1024, ... , the last one open-ended
EXPLORE = 3  # plain steps taken at a new context bucket before drafting there
PRIOR_CONTEXT = 256  # cached tokens at which the prior is measured
LONG_CONTEXT = 2048  # ... and again here, for how each width's cost grows with the context


def bucket(context: int) -> int:
    """Context bucket: 0 for L <= 512, then one per doubling."""
    return min(BUCKETS - 1, max(0, (max(context, 1) - 1).bit_length() - 9))


def _ema(old: float, new: float, n: int) -> float:
    return new if not n else old + DECAY * (new - old)


class CostModel:
    def __init__(
        self,
        widths: tuple[int, ...],
        rel: tuple[float, ...],
        learn: bool = False,
        beta: float = 0.0,
        slope: tuple[float, ...] | None = None,
    ):
        self.widths, self.rel, self.learn, self.beta = tuple(widths), tuple(_isotonic(list(rel))), learn, beta
        # seconds per extra cached token of a w-token forward, in units of a 1-token forward at PRIOR_CONTEXT
        self.slope = tuple(slope) if slope is not None else (0.0,) * len(self.widths)
        self._rel = _interp(self.widths, list(self.rel), extrapolate=True)  # per n: prior time at PRIOR_CONTEXT
        self._slope = _interp(self.widths, list(self.slope), extrapolate=True)  # per n: its growth per token
        self.plain_s = 0.0  # EMA of a plain step's seconds / (1 + beta * L): the line t1 follows
        self.plain_seen = 0  # plain steps observed
        self.bucket_ratio = [1.0] * BUCKETS  # per bucket: EMA of a plain step's seconds / (plain_s * (1 + beta * L))
        self.bucket_plain_seen = [0] * BUCKETS  # per bucket: plain steps observed there
        self.gap: list[dict[int, float]] = [{} for _ in range(BUCKETS)]  # bucket -> knot -> EMA of the gap
        self.gap_seen: list[dict[int, int]] = [{} for _ in range(BUCKETS)]  # bucket -> knot -> observations
        self.pending = 0
        self._rebuild()

    @classmethod
    def flat(cls, learn: bool = False) -> CostModel:
        """Every width costs the same: 'always draft the maximum' (tests), or, with `learn`, a start that
        knows nothing and learns the real curve from the steps it times (an engine with tuning off)."""
        return cls((1, 1024), (1.0, 1.0), learn=learn)

    @classmethod
    def measure(cls, model, widths=WIDTHS, rounds: int = 5) -> CostModel:
        """The prior: per width, the fastest of `rounds` forwards over the fastest one-token forward (the
        fastest run is the one a shared machine disturbed least; rounds interleave the widths), at
        PRIOR_CONTEXT cached tokens and, where the model's context allows, again at LONG_CONTEXT: the two
        give each width's cost as a line in the context length (`slope`)."""
        limit = model.config.max_position_embeddings
        widths = tuple(w for w in widths if w <= limit // 2) or (1,)
        short = max(1, min(PRIOR_CONTEXT, limit - max(widths) - 1))
        best, kv_per_token = _fastest(model, widths, short, rounds)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        rel = tuple(t / best[0] for t in best)
        beta, slope = kv_per_token / weights, None
        if limit >= 2 * LONG_CONTEXT:
            long, _ = _fastest(model, widths, LONG_CONTEXT, rounds)
            raw = [(t - u) / (LONG_CONTEXT - short) / best[0] for t, u in zip(long, best)]
            # More queries never make the cache cheaper to attend over, and a step streams at least the
            # cache's bytes: a non-decreasing fit, floored at the bandwidth line (timing noise of a few ms
            # would otherwise set a plain step's growth to zero).
            slope = [max(x, beta * r) for x, r in zip(_isotonic(raw), rel)]
        return cls(widths, rel, learn=True, beta=beta, slope=slope)

    def prior_json(self) -> dict:
        """The measured prior, as stored on disk (what is learned online is not stored)."""
        return {"widths": list(self.widths), "rel": list(self.rel), "slope": list(self.slope), "beta": self.beta}

    @classmethod
    def from_prior_json(cls, d) -> CostModel | None:
        """A learning cost model from `prior_json` output; None if `d` is not a well-formed prior."""
        try:
            widths, rel, slope, beta = d["widths"], d["rel"], d["slope"], float(d["beta"])
            ok = len(widths) == len(rel) == len(slope) >= 1 and widths[0] == 1 and widths == sorted(set(widths))
            ok = ok and all(isinstance(w, int) for w in widths) and rel[0] > 0
            ok = ok and all(math.isfinite(x) and x >= 0 for x in [*rel, *slope, beta])
        except (KeyError, TypeError, ValueError):
            return None
        return cls(tuple(widths), tuple(rel), learn=True, beta=beta, slope=tuple(slope)) if ok else None

    def prior(self, n: int, context: int) -> float:
        """The measured prior c(n | L): each width's time is a line in the context, relative to one token's."""
        n, d = min(max(n, 1), MAX_WIDTH), context - PRIOR_CONTEXT
        return (self._rel[n] + self._slope[n] * d) / (self._rel[1] + self._slope[1] * d)

    def _knot(self, n: int) -> int:
        """The prior's smallest width >= n (the last one beyond them): observations pool per knot."""
        return next((w for w in self.widths if w >= n), self.widths[-1])

    def _rebuild(self) -> None:
        """Fit every bucket's knots and tabulate the gaps between them and the measured prior. A knot's prior
        gap is the shorter bucket's fitted gap there (the machine's state carries over; the shape in the
        context comes from the measurement)."""
        self.gaps, self._max_useful = [], []
        carried = [0.0] * len(self.widths)
        for b in range(BUCKETS):
            measured = [self.prior(w, _typical(b)) for w in self.widths]
            seen = {}  # knot index -> observed gap, shrunk towards the carried one
            for i, w in enumerate(self.widths):
                if (k := self.gap_seen[b].get(w, 0)) and w > 1:
                    seen[i] = (k * self.gap[b][w] + PRIOR_WEIGHT * carried[i]) / (k + PRIOR_WEIGHT)
            vals, weights = [], []
            for i, w in enumerate(self.widths):
                gap = seen[i] if i in seen else (self._unseen(i, seen) if seen else carried[i])
                vals.append(1.0 if w == 1 else max(1.0, measured[i] + gap))
                weights.append(1e9 if w == 1 else self.gap_seen[b].get(w, 0) + PRIOR_WEIGHT)  # c(1) = 1
            carried = [f - m for f, m in zip(_isotonic(vals, weights), measured)]
            self.gaps.append(_interp(self.widths, carried, extrapolate=True))
            n = 1
            while n < MAX_WIDTH - 2 and (n + 2) / self.cost(n + 2, _typical(b)) > 1.0:
                n += 1
            self._max_useful.append(n)
        self.pending = 0

    def _unseen(self, i: int, seen: dict[int, float]) -> float:
        """The gap at a knot this bucket has not observed: interpolated linearly in width between the observed
        knots around it (no gap at c(1) = 1); beyond the widest observed knot, the gap seen there."""
        w = self.widths
        lo = max((j for j in seen if j < i), default=0)  # knot 0 is width 1: no gap
        hi = min((j for j in seen if j > i), default=None)
        gap_lo = seen.get(lo, 0.0)
        if hi is None:
            return gap_lo
        return gap_lo + (seen[hi] - gap_lo) * (w[i] - w[lo]) / (w[hi] - w[lo])

    def cost(self, n: int, context: int = 0) -> float:
        """Relative cost of verifying n tokens in one forward at a context of `context` cached tokens: the
        measured prior at this very context plus what its bucket learned (proportional beyond the table)."""
        m = min(max(n, 1), MAX_WIDTH)
        c = max(1.0, self.prior(m, context) + self.gaps[bucket(context)][m])
        return c if n <= MAX_WIDTH else c * n / MAX_WIDTH

    def t1(self, context: int) -> float:
        """Estimated seconds of a plain step at this context (0 before any plain step was seen)."""
        b = bucket(context)
        while b and not self.bucket_plain_seen[b]:
            b -= 1  # no plain step here yet: the nearest shorter bucket's offset from the line
        return self.plain_s * (1 + self.beta * context) * (self.bucket_ratio[b] if self.bucket_plain_seen[b] else 1.0)

    def observe(self, width: int, seconds: float, context: int = 0) -> None:
        """The decode loop ran a forward over `width` new tokens after `context` cached ones in `seconds`."""
        if not self.learn or not 1 <= width <= MAX_WIDTH:
            return
        b, line = bucket(context), 1 + self.beta * context
        if width == 1:
            if self.plain_seen:
                ratio = seconds / (self.plain_s * line)
                self.bucket_ratio[b] = _ema(self.bucket_ratio[b], ratio, self.bucket_plain_seen[b])
                self.bucket_plain_seen[b] += 1
            off = self.bucket_ratio[b] if self.bucket_plain_seen[b] else 1.0
            self.plain_s = _ema(self.plain_s, seconds / line / off, self.plain_seen)
            self.plain_seen += 1
            return
        if self.plain_seen < 3:
            return  # no plain step to compare with yet
        gap, k = seconds / self.t1(context) - self.prior(width, context), self._knot(width)
        n = self.gap_seen[b].get(k, 0)
        self.gap[b][k] = _ema(self.gap[b].get(k, 0.0), gap, n)
        self.gap_seen[b][k] = n + 1
        self.pending += 1
        if self.pending >= REFRESH or not n:  # a knot's first observation is news: use it at once
            self._rebuild()

    def best_size(self, scores: list[float], context: int = 0) -> int:
        """Number of leading nodes to verify (0 = plain step)."""
        b = bucket(context)
        if self.learn and b and self.bucket_plain_seen[b] < EXPLORE:
            return 0  # measure plain steps at this context first (bucket 0 has the measured prior)
        best_n, best_v, acc, c = 0, 1.0, 1.0, 1.0
        for n, s in enumerate(scores, start=1):
            acc += s
            c = max(c, self.cost(n + 1, context))  # a wider forward never costs less (the table can dip)
            v = acc / c
            if v > best_v:
                best_n, best_v = n, v
        return best_n

    def curves(self, widths: tuple[int, ...] = (2, 4, 8, 12, 16)) -> list[dict]:
        """What the model believes now, per context bucket that saw any step: its context range, the plain and
        verify steps observed there, the estimated plain-step seconds and c(n) at a context typical of it."""
        out = []
        for b in range(BUCKETS):
            verify = sum(self.gap_seen[b].values())
            if b and not (self.bucket_plain_seen[b] or verify):
                continue
            lo, hi = (0 if b == 0 else (512 << (b - 1)) + 1), (None if b == BUCKETS - 1 else 512 << b)
            t1 = self.t1(_typical(b)) if self.plain_seen else None
            out.append(
                {
                    "context": [lo, hi],
                    "plain_steps": self.bucket_plain_seen[b],
                    "verify_steps": verify,
                    "t1_seconds": t1,
                    "typical_context": _typical(b),
                    "cost": {str(n): round(self.cost(n, _typical(b)), 3) for n in widths},
                }
            )
        return out

    def max_useful(self, cap: int = MAX_DRAFT, context: int = 0) -> int:
        """Largest draft worth asking for: beyond it even certain acceptance would not pay."""
        return min(cap, self._max_useful[bucket(context)])


def _typical(b: int) -> int:
    """The context a bucket's prior is read at: PRIOR_CONTEXT for the first, 3/4 of the way up for the others."""
    return PRIOR_CONTEXT if b == 0 else 3 * (128 << b)


def _fastest(model, widths: tuple[int, ...], context: int, rounds: int) -> tuple[list[float], float]:
    """Fastest seconds of a forward over each width after `context` cached tokens (rounds interleave the
    widths; round 0 is warm-up), and the cache's bytes per cached token."""
    cache = model.make_cache(context + max(widths) + 1)
    model(torch.zeros(1, context, dtype=torch.long), cache, logits="none")
    best = [float("inf")] * len(widths)
    for r in range(rounds + 1):
        for i, w in enumerate(widths):
            x = torch.zeros(1, w, dtype=torch.long)
            t = time.perf_counter()
            model(x, cache, logits="all")
            if r:
                best[i] = min(best[i], time.perf_counter() - t)
            cache.trim(w)
    return best, cache.nbytes / context


def _interp(widths: tuple[int, ...], knots: list[float], extrapolate: bool) -> list[float]:
    """Per n = 0..MAX_WIDTH (index 0 unused): linear in n between the knots; beyond the last knot, the last
    segment's slope (`extrapolate`) or the last value."""
    w, table, i = widths, [0.0], 0
    for n in range(1, MAX_WIDTH + 1):
        while i + 1 < len(w) and w[i + 1] < n:
            i += 1
        if len(w) == 1 or n <= w[0]:
            v = knots[0]
        elif n > w[-1]:
            v = knots[-1] + ((knots[-1] - knots[-2]) / (w[-1] - w[-2]) * (n - w[-1]) if extrapolate else 0.0)
        else:
            v = knots[i] + (knots[i + 1] - knots[i]) * (n - w[i]) / (w[i + 1] - w[i])
        table.append(v)
    return table


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
