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

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from skipjack.cache import KVCache
from skipjack.cost import CostModel
from skipjack.drafters.base import DraftContext, Drafter, Proposal, Verdict
from skipjack.errors import SkipjackError
from skipjack.limits import MAX_DRAFT
from skipjack.models import DecoderLM
from skipjack.sampling import Sampler, SamplingParams
from skipjack.session import Session, prefill
from skipjack.sizing import CostSizer, NoDraft, Sizer
from skipjack.verify import tree_mask, verify


@dataclass
class Step:
    tokens: list[int]  # tokens emitted by this step (stop tokens excluded)
    drafted: int = 0  # draft nodes verified in this step
    accepted: int = 0  # of which accepted
    forward_tokens: int = 1  # tokens run through the model in this step
    draft_seconds: float = 0.0  # time the drafter took to propose (one-off searches excluded)
    finish: str | None = None  # "stop" | "length" on the last step
    logprobs: list[TokenLogprob] | None = None  # per emitted token, when params.logprobs is set


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


def generate(
    model: DecoderLM,
    prompt: list[int],
    params: SamplingParams,
    drafter: Drafter | None = None,
    sizer: Sizer | None = None,
    session: Session | None = None,
) -> Iterator[Step]:
    """Yield `Step`s until a stop token, `max_new_tokens`, or the context is full. `sizer` sizes the drafts
    (default: verify all a drafter proposes that has a positive score); `session`: how the request starts
    (`skipjack.session`; default: a fresh prefill of the prompt)."""
    if drafter is None:
        sizer = NoDraft()
    elif sizer is None:
        sizer = CostSizer(CostModel.flat())
    start = (session.start if session else prefill)(model, prompt, params.max_new_tokens)
    cache, sampler = start.cache, Sampler(params, prompt, model.lm_head.out_features)
    ctx, left, intact = list(prompt), params.max_new_tokens, False
    if drafter is not None:
        drafter.begin(list(prompt))
    try:
        step = Step([sampler.pick(finite(start.logits))], forward_tokens=start.ran)
        step.logprobs = _logprobs(start.logits[None], step.tokens, params.logprobs)
        while True:
            left = _finish(step, params, left, cache.capacity_left(), ctx, sampler)
            intact = True  # between steps the cache is whole
            yield step
            if step.finish:
                return
            intact = False  # a forward may stop half way through the layers
            step = _step(model, cache, ctx, left, drafter, sizer, sampler)
    finally:  # also when closed between steps (a stop string, a client gone): then the cache is whole
        if drafter is not None:
            drafter.end()
        if session is not None:
            session.end(model, cache, ctx, intact)


def _step(model, cache: KVCache, ctx: list[int], left: int, drafter, sizer: Sizer, sampler: Sampler) -> Step:
    """One decoding step: draft (if there is a drafter and room; the draft is timed and its cost reported to
    the sizer), one timed forward, verify, learn."""
    proposal, drafting = None, 0.0
    room = min(MAX_DRAFT, left - 1, cache.capacity_left() - 2)
    budget = sizer.budget(room, cache.offset) if drafter is not None else 0
    at = cache.offset
    if budget > 0:
        t = time.perf_counter()
        proposal = drafter.propose(DraftContext(ctx, budget, model, cache, sizer.more))
        once = getattr(drafter, "search_seconds", 0.0)  # one-off work (a skip-set search), not a draft's cost
        drafting = time.perf_counter() - t - once
        sizer.observe_draft(len(proposal or ()), drafting, at)
        if proposal is not None:
            proposal = proposal.prefix(min(budget, proposal.valid_length(model.lm_head.out_features)))
            proposal = sizer.size(proposal, at)
    cache.rewind(at + (1 + len(proposal) if proposal and proposal.resume else 0))  # a draft's leftover keys
    t = time.perf_counter()
    if not proposal:
        logits = finite(model(torch.tensor([[ctx[-1]]]), cache).logits[0, -1])  # [V]
        step, verdict = Step([sampler.pick(logits)]), None
        step.logprobs = _logprobs(logits[None], step.tokens, sampler.params.logprobs)
    else:
        step, verdict = _speculate(model, cache, ctx[-1], proposal, sampler, at)
    seconds = time.perf_counter() - t
    if proposal and proposal.resume:  # a verify over the top layers only: as a full pass, for the cost table
        seconds *= model.num_layers / max(1, model.num_layers - proposal.resume[0] - 1)
    sizer.observe(step.forward_tokens, seconds, at)
    step.draft_seconds = drafting
    if proposal is not None:  # drafted but sized down to nothing: still a lesson for the drafter
        drafter.observe(proposal, verdict or Verdict(step.tokens, [], []))
    return step


def _speculate(
    model, cache: KVCache, pending: int, proposal: Proposal, sampler: Sampler, start: int
) -> tuple[Step, Verdict]:
    """Verify a proposal in one forward over [pending] + its nodes, and keep only the accepted path's KV. A
    proposal with `resume` runs only the layers above its exit, from the hidden state its draft left."""
    chain = proposal.is_chain
    positions = start + torch.tensor([0] + proposal.depths())  # [T]
    mask = None if chain else tree_mask(proposal.parents)  # [T, T]
    ids = torch.tensor([[pending] + proposal.tokens])  # [1, T]
    kw = {"positions": positions, "tree_mask": mask, "return_hidden": proposal.want}
    if proposal.resume is not None:
        exit_layer, hidden = proposal.resume  # hidden [1, T, D]
        out = model(None, cache, hidden=hidden, layers=range(exit_layer + 1, model.num_layers), **kw)
    else:
        out = model(ids, cache, **kw)
    verdict = verify(finite(out.logits[0]), proposal, sampler.params, sampler.gen, sampler.seen)  # logits [T, V]
    verdict.hidden.update({i: h[0] for i, h in out.hidden.items()})  # [T, D] each
    if chain:
        cache.trim(len(proposal) - len(verdict.path))
    else:
        cache.keep(start, [0] + [c + 1 for c in verdict.path])
    step = Step(verdict.tokens, drafted=len(proposal), accepted=len(verdict.path), forward_tokens=len(ids[0]))
    if sampler.params.logprobs is not None:  # token j comes from the row of the node before it: the root, then the path
        rows = out.logits[0][[0] + [c + 1 for c in verdict.path]]  # [len(tokens), V]
        step.logprobs = _logprobs(rows, step.tokens, sampler.params.logprobs)
    return step, verdict


def finite(logits: torch.Tensor) -> torch.Tensor:
    """The logits, checked: a NaN or inf (damaged weights, an overflow) must never become a token."""
    if not bool(torch.isfinite(logits).all()):
        raise SkipjackError(
            "the model produced non-finite logits (NaN or inf): its weights may be damaged; clear the model's "
            "cache entry under SKIPJACK_HOME/converted, or try --dtype fp32"
        )
    return logits


def _finish(step: Step, params: SamplingParams, left: int, room: int, ctx: list[int], sampler: Sampler) -> int:
    """Apply stop tokens, the token budget and the context limit to a step; extend the context. Returns the
    token budget left."""
    toks = step.tokens
    for i, t in enumerate(toks):
        if t in params.stop_token_ids:
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
