"""`triforce`: lossless speculation for long contexts, the model itself drafting over a small KV cache (Sun et
al. 2024, TriForce).

At a long context a step's time goes into attention over every cached key. The draft here is the same model
with a StreamingLLM cache (`skipjack.kvpolicies.streaming`: `sinks` first positions and a window of `budget` ×
the prompt, at least `least` positions): each draft token costs the weights but only a little attention. The
draft cache takes the keys/values of every verified position from the target's full cache (copied, exact; the
draft's own keys are scratch, `KVCache.scratch`), so drafting starts each step from the target's state.
The target verifies with its full cache, so the output is plain decoding's (greedy: the same tokens;
sampling: the same distribution). TriForce's draft cache is retrieval-based (chunks picked by the last
query); a streaming window is the simpler of its two caches (the one its bottom level drafts with). No
hierarchy of a smaller model here: `mix:of=pld+triforce` adds a model-free draft instead.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from skipjack.cache import TrackedCache
from skipjack.decoding.proposal import DraftContext, Proposal, Verdict
from skipjack.drafters.base import Drafter, DraftSession, Resources
from skipjack.drafters.layered import Calibrated, DraftHead, draft
from skipjack.errors import SkipjackError
from skipjack.kvpolicies.streaming import StreamingLLM

CHUNK = 1024  # positions copied from the target's cache at a time (then the draft cache drops what it no longer needs)


class TriForce(Drafter):
    """The options, the model and its head (`prepare`), and the calibration learned across requests; each
    request's draft cache lives in its `TriForceSession`."""

    name = "triforce"
    lossless = True
    reads_past_keys = True  # its draft cache is filled with the target's cached keys, as stored
    owns_cache = True
    copies_target_keys = True  # int8 spans carry scales: only the full cache's keys can be copied
    LEARNED = ("calib",)
    cost_prior = 0.5  # a draft token's cost in target steps before one is timed (same weights, less attention)

    def __init__(self, budget: float = 0.1, least: int = 256, sinks: int = 4, threshold: float = 0.2):
        if not 0.0 <= threshold < 1.0:
            raise SkipjackError(f"triforce: threshold must be in [0, 1) (got {threshold})")
        if not 1 <= least <= 1 << 20:
            raise SkipjackError(f"triforce: least must be in [1, {1 << 20}] (got {least})")
        self.policy = StreamingLLM(budget, sinks)  # validates budget and sinks (a policy keeps no state)
        self.least, self.threshold = least, threshold
        self.model = self.head = None
        self.calib = Calibrated()

    def prepare(self, resources: Resources) -> None:
        """The target model drafts for itself: its draft head."""
        target = resources.target
        model = resources.model if resources.model is not None else target.model if target is not None else None
        if model is None:
            raise SkipjackError("triforce: drafts with the target model; none was given")
        self.model, self.head = model, DraftHead(model, 0, resources.token_counts)

    def session(self) -> TriForceSession:
        if self.model is None:
            raise SkipjackError("triforce: the drafter is not prepared (`prepare(resources)` names the model)")
        return TriForceSession(self)


class TriForceSession(DraftSession):
    """One request: the draft cache (a StreamingLLM cache) and the tokens whose target keys it holds."""

    def __init__(self, drafter: TriForce):
        self.drafter = drafter
        self.held = TrackedCache()

    def begin(self, prompt: list[int]) -> None:
        self.held = TrackedCache()  # a new request: its own draft cache

    def end(self) -> None:
        self.held.clear()

    def _sync(self, ctx: DraftContext) -> None:
        """Hold the target's keys/values of every verified position (the draft cache keeps what it needs)."""
        d, n = self.drafter, ctx.cache.offset
        if self.held.cache is None:
            cache = d.model.make_cache(ctx.cache.capacity, policy=d.policy)
            d.policy.fix(cache, max(d.least, math.ceil(d.policy.budget * n)))
            self.held = TrackedCache(cache)
        cache, missing = self.held.cache, self.held.sync(ctx.tokens[:n])
        for lo in range(len(self.held), n, CHUNK):
            hi = min(n, lo + CHUNK)
            for layer, (k, v) in zip(cache, ctx.cache.span(lo, hi)):
                layer.update(k, v, lo)
            cache.settle()
        self.held.extend(missing)

    def propose(self, ctx: DraftContext) -> Proposal | None:
        d = self.drafter
        if ctx.model is not d.model:
            raise SkipjackError("triforce: it was prepared for another model than this request's")
        self._sync(ctx)
        cache = self.held.cache

        def run(token: int, pos: int) -> torch.Tensor:
            out = d.model(torch.tensor([[token]]), cache, positions=torch.tensor([pos]), logits="none")
            return out.last_hidden  # [1, 1, D]

        with cache.scratch():  # the draft's own keys go when it is done
            prop, raw = draft(dataclasses.replace(ctx, cache=cache), run, d.head, d.threshold, d.calib)
        if prop is not None:
            prop.state = raw
        return prop

    def observe(self, proposal: Proposal, verdict: Verdict) -> None:
        self.drafter.calib.learn(proposal, verdict, proposal.state)
