"""Continuous batching: sequences decoded together, one forward pass per step for all of them (as in Orca and
vLLM, on a CPU whose step time is the weights' streaming, nearly flat in the batch).

A sequence joins after its prompt's own forward pass (the prefill in `Sequence`), and leaves as soon as it
finishes or is dropped (a client gone). Each step, every live sequence drafts with its own method and draft
length, all of them run in one `DecoderLM.forward_batch` (rows concatenated through the linears, each
sequence's rows attending only to its own cache), and each verifies its own draft. The pass's rows are capped
at `MAX_DRAFT + 1`, the widest the batch-invariant q4/q8 kernels take: with B sequences each drafts at most
(MAX_DRAFT + 1) // B - 1 nodes. Within that, the batch's verify pass is sized for the whole batch by
`BatchCost` (vLLM's `disable_by_batch_size`, but measured): each sequence's own sizer proposes what would pay
alone, then nodes are taken best score first, across sequences, while the expected tokens per second of the
pass, (B + sum of the kept nodes' scores) / t(B, rows), still rises; t is learned from the batch's own timed
passes, and each score is scaled by its sequence's trust in its drafter's scores (the sizer's: accepted nodes
over verified nodes' summed scores). So speculation turns down as the batch grows, as far as the measured
costs say it should. Drafting itself costs time even when the batch then verifies none of it, and the cost
model can be wrong, so each width also measures whole steps (draft, pass, verify) in tokens per second, with
and without drafting: a drafting step that kept nothing, or while drafting steps have been the slower, is a
loss, and after n losses in a row the batch's sequences skip drafting for 2^n - 1 steps (at most
`MAX_PAUSE`), then try again. A sequence alone steps exactly as `generate` steps it. Where the
forward is batch-invariant, a batched sequence's tokens equal its tokens alone (a test checks it); elsewhere (fp32 or
bf16 dense GEMMs) rounding can differ.
"""

from __future__ import annotations

import heapq
import time

from skipjack.decoding.cost import WIDTHS, CostModel
from skipjack.decoding.sequence import Sequence, Step
from skipjack.limits import MAX_DRAFT

MAX_ROWS = MAX_DRAFT + 1  # rows of one batched pass at most (and so sequences in a batch at most)


class BatchCost:
    """Seconds of a batched pass over B sequences with E draft rows on top of their B pending tokens, learned
    from the batch's timed passes: an EMA per (B, knot of E). A knot not yet timed at this B is estimated from
    the nearest timed one by the single-sequence cost model's ratio c(B + E) / c(B + E_timed) (the prior when
    none is timed). Only ratios within one B matter: a step compares widths at its own batch size."""

    DECAY = 0.1
    KNOTS = (0, *WIDTHS)  # draft rows of a pass, pooled into the smallest knot >= them
    MAX_PAUSE = 31  # steps without drafting at most, after drafting steps that lost
    PROBE = 32  # every PROBE-th step at a width is a plain one, so the plain rate it is compared with stays fresh

    def __init__(self, cost: CostModel | None = None):
        self.cost = cost or CostModel.flat()
        self.seen: dict[tuple[int, int], tuple[float, int]] = {}  # (B, knot) -> (EMA seconds, observations)
        self.idle: dict[int, tuple[int, int]] = {}  # B -> (drafting steps in a row that lost, steps left paused)
        self.rate: dict[tuple[int, bool], tuple[float, int]] = {}  # (B, drafting) -> (EMA tokens/s, steps)
        self.steps: dict[int, int] = {}  # B -> steps taken at that width

    def drafts(self, b: int) -> bool:
        """Whether a B-wide step drafts: not while paused after drafting steps that lost, nor on every PROBE-th
        step (a plain probe); counts the step."""
        misses, wait = self.idle.get(b, (0, 0))
        if wait:
            self.idle[b] = (misses, wait - 1)
        self.steps[b] = self.steps.get(b, 0) + 1
        return not wait and self.steps[b] % self.PROBE != 0

    def outcome(self, b: int, asked: bool, kept: bool, drafted: bool, tokens: int, seconds: float) -> None:
        """After a B-wide step (drafting, sizing, the pass, verifying) that emitted `tokens` in `seconds`:
        `asked` whether its sequences were asked to draft, `drafted` whether any proposed a scored node, `kept`
        whether the pass verified any. A drafting step loses when it kept nothing, or when drafting steps at this
        width have been slower than plain ones (tokens per second, EMAs over whole steps); after n losses in a
        row drafting pauses 2^n - 1 steps, a win ends the run."""
        old, n = self.rate.get((b, asked), (0.0, 0))
        r = tokens / seconds if seconds > 0 else old
        self.rate[(b, asked)] = (old + (self.DECAY if n else 1.0) * (r - old), n + 1)
        if not asked or not drafted:
            return
        plain, draft = self.rate.get((b, False)), self.rate[(b, True)]
        slower = plain is not None and plain[1] >= 3 and draft[1] >= 3 and draft[0] < plain[0]
        if kept and not slower:
            self.idle[b] = (0, 0)
        else:
            misses = self.idle.get(b, (0, 0))[0] + 1
            self.idle[b] = (misses, min(self.MAX_PAUSE, 2**misses - 1))

    def _knot(self, extra: int) -> int:
        return next((k for k in self.KNOTS if k >= extra), self.KNOTS[-1])

    def observe(self, b: int, extra: int, seconds: float) -> None:
        key = (b, self._knot(extra))
        old, n = self.seen.get(key, (seconds, 0))
        self.seen[key] = (old + (self.DECAY if n else 1.0) * (seconds - old), n + 1)

    def seconds(self, b: int, extra: int, context: int, timed: list[int] | None = None) -> float:
        """Estimated seconds (in the units of the nearest timed knot; relative to c(1) = 1 if none). `timed`:
        the knots timed at this B, when the caller has them."""
        prior = lambda e: self.cost.cost(b + e, context)  # noqa: E731
        timed = [k for k in self.KNOTS if (b, k) in self.seen] if timed is None else timed
        if not timed:
            return prior(extra)
        own = self._knot(extra)
        k = own if own in timed else min(timed, key=lambda t: (abs(t - extra), t))
        return self.seen[(b, k)][0] * prior(extra) / prior(k)

    def choose(self, proposals: list, context: int, fixed: list[bool] | None = None, trust=None) -> list[int]:
        """How many leading nodes of each proposal the pass verifies: nodes in order of score, across
        sequences (each sequence's nodes in its own order), while (B + sum of scores) / seconds rises.
        A proposal of a fixed size (`fixed`: the user's `k`) or without scores is kept whole. `trust`: each
        sequence's scores are worth this much (1: as they are)."""
        b, fixed = len(proposals), fixed or [False] * len(proposals)
        trust = trust or [1.0] * b
        whole = [bool(p) and (f or p.scores is None) for p, f in zip(proposals, fixed)]
        keep = [len(p) if w else 0 for p, w in zip(proposals, whole)]
        proposals = [None if w else p for p, w in zip(proposals, whole)]
        rows, gain = sum(keep), float(b)
        timed = [k for k in self.KNOTS if (b, k) in self.seen]
        best, best_keep = gain / self.seconds(b, rows, context, timed), list(keep)
        heap = [(-p.scores[0], i) for i, p in enumerate(proposals) if p and p.scores is not None]
        heapq.heapify(heap)
        while heap:
            s, i = heapq.heappop(heap)
            keep[i], rows, gain = keep[i] + 1, rows + 1, gain - s * trust[i]
            if keep[i] < len(proposals[i]):
                heapq.heappush(heap, (-proposals[i].scores[keep[i]], i))
            if (v := gain / self.seconds(b, rows, context, timed)) > best:
                best, best_keep = v, list(keep)
        return best_keep


class Batch:
    def __init__(self, model, rows: int = MAX_ROWS, cost: BatchCost | None = None):
        self.model, self.rows, self.cost = model, rows, cost or BatchCost()
        self.live: list[Sequence] = []

    def add(self, seq: Sequence) -> Step:
        """Admit a prefilled sequence; returns its first step (a sequence that ends there is closed)."""
        if len(self.live) >= self.rows:
            raise ValueError(f"a batch holds at most {self.rows} sequences")
        step = seq.first()
        if step.finish:
            seq.close()
        else:
            self.live.append(seq)
        return step

    def drop(self, seq: Sequence) -> None:
        """Remove a sequence between steps (its cache is whole) and close it."""
        if seq in self.live:
            self.live.remove(seq)
        seq.close()

    def step(self) -> list[tuple[Sequence, Step]]:
        """One step of every live sequence; finished ones leave the batch (closed)."""
        solo = [s for s in self.live if s.strategy is not None]  # a lossy layer plan: its own pass
        live = [s for s in self.live if s.strategy is None]
        out = [(s, s.advance()) for s in solo]
        if len(live) == 1:
            out.append((live[0], live[0].advance()))
        elif live:
            out += self._together(live)
        for s, st in out:
            if st.finish:
                self.drop(s)
        return out

    def _together(self, live: list[Sequence]) -> list[tuple[Sequence, Step]]:
        """One pass over several sequences: draft (unless paused), size across them, verify each."""
        b, cap = len(live), max(0, self.rows // len(live) - 1)
        start, go = time.perf_counter(), self.cost.drafts(b)
        for s in live:
            s.draft(cap, full=True, propose=go or s.sizer.fixed)
        context = sum(s.at for s in live) // b
        fixed = [s.sizer.fixed for s in live]
        scored = [s.proposal is not None and s.proposal.scores is not None and not f for s, f in zip(live, fixed)]
        trust = [s.sizer.trust for s in live]
        for s, n in zip(live, self.cost.choose([s.proposal for s in live], context, fixed, trust)):
            if s.proposal is not None:
                s.proposal = s.proposal.prefix(n)
        kept = any(sc and bool(s.proposal) for s, sc in zip(live, scored))
        segs = [s.segment() for s in live]
        want = {i for s in live if s.proposal is not None for i in s.proposal.want}
        t = time.perf_counter()
        outs = self.model.forward_batch(segs, want)
        self.cost.observe(b, sum(len(s.proposal or ()) for s in live), time.perf_counter() - t)
        out = [(s, s.settle(o, None)) for s, o in zip(live, outs)]
        tokens = sum(len(st.tokens) for _, st in out)
        self.cost.outcome(b, go, kept, any(scored), tokens, time.perf_counter() - start)
        return out
