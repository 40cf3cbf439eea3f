"""`triforce`: lossless speculation for long contexts, the model itself drafting over a small KV cache (Sun et
al. 2024, TriForce).

At a long context a step's time goes into attention over every cached key. The draft here is the same model
with a StreamingLLM cache (`skipjack.kvpolicies.streaming`: `sinks` first positions and a window of `budget` ×
the prompt, at least `least` positions): each draft token costs the weights but only a little attention. The
draft cache takes the keys/values of every verified position from the target's full cache (copied, exact; the
draft's own scratch keys are dropped before each step), so drafting starts each step from the target's state.
The target verifies with its full cache, so the output is plain decoding's (greedy: the same tokens;
sampling: the same distribution). TriForce's draft cache is retrieval-based (chunks picked by the last
query); a streaming window is the simpler of its two caches (the one its bottom level drafts with). No
hierarchy of a smaller model here: `mix:of=pld+triforce` adds a model-free draft instead.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from skipjack.decoding.proposal import DraftContext, Proposal, Verdict
from skipjack.drafters.layered import Calibrated, DraftHead, SharesModels, draft
from skipjack.errors import SkipjackError
from skipjack.kvpolicies.streaming import StreamingLLM

CHUNK = 1024  # positions copied from the target's cache at a time (then the draft cache drops what it no longer needs)


class TriForce(SharesModels):
    name = "triforce"
    lossless = True
    cost_prior = 0.5  # a draft token's cost in target steps before one is timed (same weights, less attention)

    def __init__(
        self, budget: float = 0.1, least: int = 256, sinks: int = 4, threshold: float = 0.2, shared: dict | None = None
    ):
        if not 0.0 <= threshold < 1.0:
            raise SkipjackError(f"triforce: threshold must be in [0, 1) (got {threshold})")
        if not 1 <= least <= 1 << 20:
            raise SkipjackError(f"triforce: least must be in [1, {1 << 20}] (got {least})")
        self.policy = StreamingLLM(budget, sinks)  # validates budget and sinks
        self.least, self.threshold = least, threshold
        self.shared = shared if shared is not None else {}
        self.model = self.head = self.cache = None
        self.exact = 0  # positions of the draft cache copied from the target (the rest is scratch)
        self.calib = Calibrated()

    def begin(self, prompt: list[int]) -> None:
        self.cache, self.exact = None, 0

    def end(self) -> None:
        self.cache, self.exact = None, 0

    def _sync(self, ctx: DraftContext) -> None:
        """Hold the target's keys/values of every verified position (the draft cache keeps what it needs)."""
        n = ctx.cache.offset
        if self.cache is None:
            if ctx.model is not self.model:
                self.model, self.head = ctx.model, DraftHead(ctx.model, 0, self.shared.get("token_counts"))
            self.cache = ctx.model.make_cache(ctx.cache.capacity, policy=self.policy)
            self.policy.fix(self.cache, max(self.least, math.ceil(self.policy.budget * n)))
        self.cache.rewind(self.exact)
        for lo in range(self.exact, n, CHUNK):
            hi = min(n, lo + CHUNK)
            for layer, (k, v) in zip(self.cache, ctx.cache.span(lo, hi)):
                layer.update(k, v, lo)
            self.cache.settle()
        self.exact = n

    def propose(self, ctx: DraftContext) -> Proposal | None:
        self._sync(ctx)

        def run(token: int, pos: int) -> torch.Tensor:
            out = self.model(torch.tensor([[token]]), self.cache, positions=torch.tensor([pos]), logits="none")
            return out.last_hidden  # [1, 1, D]

        own = dataclasses.replace(ctx, cache=self.cache)
        prop, raw = draft(own, run, self.head, self.threshold, self.calib)
        self.cache.rewind(self.exact)  # the draft's scratch keys
        if prop is not None:
            prop.state = raw
        return prop

    def observe(self, proposal: Proposal, verdict: Verdict) -> None:
        self.calib.learn(proposal, verdict, proposal.state)
