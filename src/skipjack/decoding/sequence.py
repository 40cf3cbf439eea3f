"""The one decode generator. The engine (and through it the CLI, the server and the benchmark) consumes it.

Plain decoding: prefill the prompt, then one forward per token. Speculative decoding (any drafter): the
cache holds every token except the pending one (the last emitted); each step the sizer says how many draft
nodes are worth asking for, the drafter proposes a chain or tree, the sizer trims it to the size with the best
expected tokens per unit cost, one forward over [pending] + draft verifies it (tree mask, positions by
depth), `verify` picks the accepted path plus a bonus token, and the cache is rolled back (`trim`) or, for
trees, the accepted path's KV is compacted into place. Every step's forward (with verification and rollback)
is timed and reported to the sizer (the cost model calibrates itself online), and the drafter sees the
verdict.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from skipjack.cache import KVCache
from skipjack.decoding.cost import CostModel
from skipjack.decoding.plan import Plan
from skipjack.decoding.proposal import DraftContext, Proposal, Verdict
from skipjack.decoding.sampling import Sampler, SamplingParams
from skipjack.decoding.session import Prefill, Start
from skipjack.decoding.sizing import CostSizer, NoDraft
from skipjack.decoding.verify import tree_mask, verify
from skipjack.errors import Fault
from skipjack.limits import MAX_DRAFT
from skipjack.models import DecoderLM
from skipjack.models.common import Segment


@dataclass
class Step:
    tokens: list[int]  # tokens emitted by this step (stop tokens excluded)
    drafted: int = 0  # draft nodes verified in this step
    accepted: int = 0  # of which accepted
    forward_tokens: int = 1  # tokens run through the model in this step
    draft_seconds: float = 0.0  # time the drafter took to propose (one-off searches excluded)
    finish: str | None = None  # "stop" | "length" on the last step
    logprobs: list[TokenLogprob] | None = None  # per emitted token, when params.logprobs is set
    kv_bytes: int | None = None  # on the last step: the bytes of keys/values the cache held at the end


@dataclass
class TokenLogprob:
    """A token's log-probability under the model's raw distribution (log-softmax of its logits, before any
    sampling setting), and the `params.logprobs` most likely tokens' [(id, log-probability)]."""

    logprob: float
    top: list[tuple[int, float]]


def _logprobs(logits: torch.Tensor, tokens: list[int], top: int | None) -> list[TokenLogprob] | None:
    """Logprobs of `tokens`, the i-th from logits row i ([T, V]); None when not asked for (`top` None)."""
    if top is None:
        return None
    lp = torch.log_softmax(logits[: len(tokens)].float(), -1)  # [n, V]
    out = []
    for i, t in enumerate(tokens):
        vals, ids = lp[i].topk(top) if top else (lp[i][:0], lp[i][:0].long())
        out.append(TokenLogprob(float(lp[i, t]), list(zip(ids.tolist(), vals.tolist()))))
    return out


def generate(model: DecoderLM, prompt: list[int], params: SamplingParams, plan: Plan | None = None) -> Iterator[Step]:
    """Yield `Step`s until a stop token, `max_new_tokens`, or the context is full, decoding as `plan` says
    (`skipjack.decoding.plan`: the drafter's session, the sizer, a lossy layer strategy, the KV cache policy,
    how the request starts; default: plain decoding from a fresh prefill, every key kept)."""
    seq = Sequence(model, plan or Plan(), prompt, params)
    try:
        step = seq.first()
        while True:
            yield step
            if step.finish:
                return
            step = seq.advance()
    finally:  # also when closed between steps (a stop string, a client gone): then the cache is whole
        seq.close()


class Sequence:
    """One request's decoding state, stepped by `generate` alone or by `skipjack.decoding.batch.Batch` with others.
    A step is `plan` (draft, size, the forward's inputs), one forward (alone or batched), `settle` (verify,
    roll the cache back, learn, apply stop and length)."""

    def __init__(self, model: DecoderLM, plan: Plan, prompt: list[int], params: SamplingParams, chunked=False):
        """`chunked`: the prompt runs later, in parts (`prefill`), as a server's chunked prefill does; else now."""
        drafter, sizer, session, strategy, policy = plan.draft, plan.sizer, plan.session, plan.strategy, plan.policy
        if drafter is None:
            sizer = NoDraft()
        elif sizer is None:
            sizer = CostSizer(CostModel.flat())
        if strategy is not None and strategy.repetition_penalty != 1.0 and params.repetition_penalty == 1.0:
            params = dataclasses.replace(params, repetition_penalty=strategy.repetition_penalty)  # DoLa's
        self.model, self.params, self.drafter, self.sizer, self.session = model, params, drafter, sizer, session
        self.strategy, self.planned, self.prompt, self.closed = strategy, plan, list(prompt), False
        if session is not None:
            self.pending = session.begin(model, prompt, params.max_new_tokens)
        else:
            self.pending = Prefill(model, prompt, params.max_new_tokens, policy=policy)
        self.cache = self.pending.cache
        if strategy is not None and strategy.scores_prompt:  # the first token is the strategy's too (DoLa)
            strategy.prompt_started(model, list(prompt), params.max_new_tokens)
            self.pending.last = lambda ids, cache: strategy.prompt_forward(model, ids, cache)
        if not chunked:
            self._started(self.pending.run())

    def prefill(self, n: int) -> bool:
        """Run at most n more prompt tokens; whether the prompt has run (then `first` gives its step)."""
        start = self.pending.run(n)
        if start is not None:
            self._started(start)
        return start is not None

    def _started(self, start: Start) -> None:
        model, params, prompt, plan = self.model, self.params, self.prompt, self.planned
        self.constraint = plan.constraint
        self.cache = start.cache
        self.sampler = Sampler(params, prompt, model.lm_head.out_features, plan.constraint)
        self.ctx, self.left, self.intact = list(prompt), params.max_new_tokens, False
        if self.drafter is not None:
            self.drafter.begin(list(prompt))
        self.n_prompt = len(prompt)
        if self.strategy is not None:
            self.strategy.begin(model, len(prompt), params.max_new_tokens)
        self.start, self.pending = start, None
        self.proposal: Proposal | None = None
        self.at, self.drafting, self.forced = 0, 0.0, False

    def first(self) -> Step:
        """The prompt's step: the token after the prompt."""
        start = self.start
        step = Step([self.sampler.pick(finite(start.logits))], forward_tokens=start.ran)
        step.logprobs = _logprobs(start.logits[None], step.tokens, self.params.logprobs)
        return self._done(step)

    def advance(self) -> Step:
        """One whole step on its own: plan, one timed forward, settle."""
        seg = self.plan()
        t = time.perf_counter()
        p = self.proposal
        if p and p.resume is not None:  # a verify over the layers above the draft's exit (an empty draft: plain)
            exit_layer, hidden = p.resume  # hidden [1, T, D]
            out = self.model(
                None,
                self.cache,
                hidden=hidden,
                layers=range(exit_layer + 1, self.model.num_layers),
                positions=seg.positions,
                tree_mask=seg.tree_mask,
                return_hidden=p.want,
            )
        elif p:
            out = self.model(
                seg.ids, self.cache, positions=seg.positions, tree_mask=seg.tree_mask, return_hidden=p.want
            )
        elif self.strategy is not None:  # generated token index of the input: the pending token's
            out = self.strategy.forward(self.model, seg.ids, self.cache, self.cache.offset - self.n_prompt)
        else:
            out = self.model(seg.ids, self.cache)
        return self.settle(out, time.perf_counter() - t)

    def plan(self, cap: int = MAX_DRAFT, full: bool = False) -> Segment:
        """Draft and size (`draft`), and return the forward's inputs (`segment`)."""
        self.draft(cap, full)
        return self.segment()

    def draft(self, cap: int = MAX_DRAFT, full: bool = False, propose: bool = True) -> None:
        """Draft (if there is a drafter and room; timed, its cost reported to the sizer) at most `cap` nodes
        and size it (`self.proposal`; a batch may cut it further before `segment`). `full`: the verify runs
        every layer (a batched pass), so a draft's saved hidden states are not used. `propose`: False asks
        nothing of the drafter (a paused batch); tokens a grammar forces are still proposed."""
        self.intact = False  # a forward may stop half way through the layers
        model, cache, ctx, drafter, sizer = self.model, self.cache, self.ctx, self.drafter, self.sizer
        proposal, self.drafting = None, 0.0
        room = min(MAX_DRAFT, cap, self.left - 1, cache.capacity_left() - 2, cache.room() - 1)
        budget = sizer.budget(room, cache.offset) if drafter is not None and propose else 0
        self.at = at = cache.offset
        self.forced = False
        forced = self._forced(room) if drafter is not None else None
        if forced:  # jump-forward, as a draft; a model-free drafter may go on after it
            proposal, self.forced = forced, True
            budget = min(budget, room - len(forced)) if drafter.model_free else 0
        if budget > 0:
            t = time.perf_counter()
            base = ctx + forced.tokens if forced else ctx
            drafted = drafter.propose(DraftContext(base, budget, model, cache, sizer.more, sizer.fit))
            self.drafting = time.perf_counter() - t
            sizer.observe_draft(len(drafted or ()), self.drafting, at)
            if drafted is not None:
                drafted = drafted.prefix(min(budget, drafted.valid_length(model.lm_head.out_features)))
                drafted = sizer.size(drafted, at)
                proposal = forced.graft(drafted) if forced else drafted
                if self.constraint is not None:  # a token the grammar forbids ends the draft
                    proposal = self.constraint.cut(proposal)
                if full and proposal is not None and proposal.resume is not None:  # a copy: the drafter's stays
                    proposal = dataclasses.replace(proposal, resume=None)
        cache.rewind(at + (1 + len(proposal) if proposal and proposal.resume else 0))  # a draft's leftover keys
        self.proposal = proposal

    def _forced(self, room: int) -> Proposal | None:
        """What the grammar forces next (jump-forward), as a chain draft of at most `room` tokens; None if
        nothing is forced or there is no grammar."""
        if self.constraint is None or room <= 0:
            return None
        return self.constraint.cut(Proposal.chain(self.constraint.forced()[:room])) or None

    def segment(self) -> Segment:
        """The step's forward inputs: [pending] + the proposal's nodes (tree mask, positions by depth)."""
        proposal, ctx, at = self.proposal, self.ctx, self.at
        if not proposal:
            return Segment(torch.tensor([[ctx[-1]]]), self.cache)
        positions = at + torch.tensor([0] + proposal.depths())  # [T]
        mask = None if proposal.is_chain else tree_mask(proposal.parents)  # [T, T]
        return Segment(torch.tensor([[ctx[-1]] + proposal.tokens]), self.cache, positions, mask)  # ids [1, T]

    def settle(self, out, seconds: float | None) -> Step:
        """The step from its forward's output: verify, roll back, learn. `seconds`: the forward's time, for
        the cost model (None: a batched pass, whose time is not this sequence's alone)."""
        proposal, cache, sampler, at = self.proposal, self.cache, self.sampler, self.at
        if not proposal:
            logits = finite(out.logits[0, -1], out.finite)  # [V]
            step, verdict = Step([sampler.pick(logits, None if out.argmax is None else out.argmax[-1])]), None
            step.logprobs = _logprobs(logits[None], step.tokens, sampler.params.logprobs)
        else:
            step, verdict = _verified(out, cache, proposal, sampler, at)
        if seconds is not None:
            if proposal and proposal.resume:  # a verify over the top layers only: as a full pass, for the cost
                seconds *= self.model.num_layers / max(1, self.model.num_layers - proposal.resume[0] - 1)
            self.sizer.observe(step.forward_tokens, seconds, at)
        step.draft_seconds = self.drafting
        if proposal is not None and not self.forced:  # drafted but sized down to nothing: still a lesson
            self.drafter.observe(proposal, verdict or Verdict(step.tokens, [], []))
            if proposal and proposal.scores is not None:  # how far the drafter's scores can be trusted
                self.sizer.observe_accept(sum(proposal.scores), step.accepted)
        cache.settle()  # a cache policy may compress now (never inside a step: drafts stop at its points)
        return self._done(step)

    def _done(self, step: Step) -> Step:
        self.left = _finish(step, self.params, self.left, self.cache.capacity_left(), self.ctx, self.sampler)
        self.intact = True  # between steps the cache is whole
        if step.finish:
            step.kv_bytes = self.cache.nbytes
        return step

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.pending is not None:  # closed before its prompt had run: nothing to end or keep
            return
        if self.drafter is not None:
            self.drafter.end()
        if self.session is not None:
            whole = self.strategy is None or self.strategy.keeps_cache_whole()
            self.session.end(self.model, self.cache, self.ctx, self.intact and whole)


def _verified(out, cache: KVCache, proposal: Proposal, sampler: Sampler, start: int) -> tuple[Step, Verdict]:
    """Verify a proposal from its forward over [pending] + its nodes, and keep only the accepted path's KV."""
    logits = finite(out.logits[0], out.finite)  # [T, V]
    allowed = None if sampler.constraint is None else sampler.constraint.rows(proposal)  # [T, V]
    hist = (sampler.counts, sampler.generated, allowed)
    verdict = verify(logits, proposal, sampler.params, sampler.gen, sampler.seen, out.argmax, *hist)
    verdict.hidden.update({i: h[0] for i, h in out.hidden.items()})  # [T, D] each
    if proposal.is_chain:
        cache.trim(len(proposal) - len(verdict.path))
    else:
        cache.keep(start, [0] + [c + 1 for c in verdict.path])
    step = Step(verdict.tokens, drafted=len(proposal), accepted=len(verdict.path), forward_tokens=len(proposal) + 1)
    if sampler.params.logprobs is not None:  # token j comes from the row of the node before it: the root, then the path
        rows = out.logits[0][[0] + [c + 1 for c in verdict.path]]  # [len(tokens), V]
        step.logprobs = _logprobs(rows, step.tokens, sampler.params.logprobs)
    return step, verdict


def finite(logits: torch.Tensor, checked: bool | None = None) -> torch.Tensor:
    """The logits, checked: a NaN or inf (damaged weights, an overflow) must never become a token. `checked`:
    the native step's own answer for them. Else their sum says it (finite unless some logit is not, or the sum
    overflows, when every element is looked at)."""
    if checked is None:
        checked = math.isfinite(float(logits.sum())) or bool(torch.isfinite(logits).all())
    if not checked:
        raise Fault(
            "the model produced non-finite logits (NaN or inf): its weights may be damaged; clear the model's "
            "cache entry under SKIPJACK_HOME/converted, or try --dtype fp32"
        )
    return logits


def _finish(step: Step, params: SamplingParams, left: int, room: int, ctx: list[int], sampler: Sampler) -> int:
    """Apply stop tokens, the token budget and the context limit to a step; extend the context. Returns the
    token budget left."""
    toks = step.tokens
    for i, t in enumerate(toks):
        if t in params.stop_token_ids and not params.ignore_eos:
            toks, step.finish = toks[:i], "stop"
            break
    if len(toks) >= left:
        toks, step.finish = toks[:left], step.finish or "length"
    elif room <= 1 and not step.finish:
        step.finish = "length"
    step.tokens = toks
    if step.logprobs is not None:
        step.logprobs = step.logprobs[: len(toks)]
    ctx.extend(toks)
    sampler.saw(toks)
    return left - len(toks)
