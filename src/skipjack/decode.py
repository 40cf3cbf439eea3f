"""The one decode generator. The CLI, the server and the benchmark all consume `generate()`.

Plain decoding: prefill the prompt, then one forward per token. Speculative decoding (any drafter): the
cache holds every token except the pending one (the last emitted); each step the drafter proposes a chain
or tree, the cost model trims it to the size with the best expected tokens per unit cost, one forward over
[pending] + draft verifies it (tree mask, positions by depth), `verify` picks the accepted path plus a bonus
token, and the cache is rolled back (`trim`) or, for trees, the accepted path's KV is compacted into place.
Every step's forward (with verification and rollback) is timed and reported to the cost model, which
calibrates itself online.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from skipjack import padding
from skipjack.cache import KVCache
from skipjack.cost import CostModel, cpu_name
from skipjack.drafters.base import Drafter, Proposal
from skipjack.errors import SkipjackError
from skipjack.loading import cache_file, write_atomic
from skipjack.models import DecoderLM
from skipjack.sampling import SamplingParams, penalize, probs, sample
from skipjack.verify import tree_mask, verify

MAX_DRAFT = 64  # hard cap on draft nodes per step (also the sliding caches' rollback slack)


@dataclass
class Step:
    tokens: list[int]  # tokens emitted by this step (stop tokens excluded)
    drafted: int = 0  # draft nodes verified in this step
    accepted: int = 0  # of which accepted
    forward_tokens: int = 1  # tokens run through the model in this step
    finish: str | None = None  # "stop" | "length" on the last step


def check_prompt(model: DecoderLM, prompt: list[int], max_new_tokens: int) -> int:
    """Validate the prompt; return the cache capacity the request needs."""
    ctx = model.config.max_position_embeddings
    if not prompt:
        raise SkipjackError("the prompt is empty")
    vocab = model.embed_tokens.shape[0]
    if min(prompt) < 0 or max(prompt) >= vocab:
        raise SkipjackError(f"prompt token ids must be in [0, {vocab})")
    if len(prompt) >= ctx:
        raise SkipjackError(f"the prompt has {len(prompt)} tokens but the model's context is {ctx}")
    return min(ctx, len(prompt) + max_new_tokens + MAX_DRAFT + 1)


@dataclass
class Prefilled:
    """A prompt run through the model once: its KV cache and the next-token logits after it.

    Prompt caching, as llama.cpp's and mlx-lm's prompt caches: requests over the same prompt (several methods,
    samples or retries) start from a copy of this instead of each running the prompt again. Made by
    `prefill`; `generate(..., prefilled=p)` copies it and never changes it."""

    prompt: tuple[int, ...]
    cache: KVCache
    logits: torch.Tensor  # [V] fp32


def prefill(
    model: DecoderLM, prompt: list[int], max_new_tokens: int, cache: KVCache | None = None, held: int = 0
) -> Prefilled:
    """Run `prompt` once, with a cache sized for requests of up to `max_new_tokens` new tokens; or, given a
    `cache` that already holds the first `held` prompt tokens (and room for the request), run only the rest."""
    padding.tune(model)  # measured once per model and machine (cached on disk): see skipjack.padding
    if cache is None:
        cache, held = model.make_cache(check_prompt(model, prompt, max_new_tokens)), 0
    logits = model(torch.tensor([prompt[held:]]), cache, logits="last").logits[0, -1]  # [V]
    return Prefilled(tuple(prompt), cache, logits)


def _reuse(model: DecoderLM, prompt: list[int], max_new_tokens: int, prefilled: Prefilled) -> Prefilled:
    """A copy of `prefilled` for this request (its cache is written to; the original stays as it was)."""
    need = check_prompt(model, prompt, max_new_tokens)
    if list(prefilled.prompt) != list(prompt):
        raise SkipjackError("the prefilled prompt is not this request's prompt")
    if prefilled.cache.capacity < need:
        raise SkipjackError(
            f"the prefilled cache holds {prefilled.cache.capacity} positions; this request needs {need}"
        )
    return Prefilled(prefilled.prompt, copy.deepcopy(prefilled.cache), prefilled.logits)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class PromptCache:
    """A conversation's KV cache, carried from each request to the next (multi-turn prompt caching, as
    llama.cpp's `cache_prompt` and mlx-lm's chat prompt cache).

    After a request it holds the keys/values of every token that request ran: the prompt and the output up
    to the last token fed back. The next request, whose prompt usually extends the conversation, keeps the
    longest common prefix of the two and runs only the rest of its prompt: one turn's new message rather
    than the whole history. A request takes the cache over (no copy) and leaves its own state behind; a
    request that fails part way clears it. The kept prefix is exact (the same keys/values); the rest of the
    prompt runs as one chunk after it, so the logits match a fresh prefill to float rounding, as for any
    chunked prefill. Falls back to a full prefill for another model, no common prefix, or a sliding-window
    layer that has already dropped keys the new tokens need."""

    def __init__(self) -> None:
        self.model: DecoderLM | None = None
        self.tokens: list[int] = []  # the tokens whose keys/values `cache` holds, in order
        self.cache: KVCache | None = None

    def clear(self) -> None:
        self.model, self.tokens, self.cache = None, [], None

    def start(self, model: DecoderLM, prompt: list[int], max_new_tokens: int) -> tuple[Prefilled, int]:
        """`prompt` prefilled for a request, reusing what this cache holds; and how many prompt tokens it reused."""
        need = check_prompt(model, prompt, max_new_tokens)
        cache, held, same = self.cache, self.tokens, self.model is model
        self.clear()  # taken over by this request
        n = common_prefix(held, prompt[:-1]) if cache is not None and same else 0  # the last token must run
        if n == 0 or not cache.resumable(n):
            return prefill(model, prompt, max_new_tokens), 0
        cache.trim(cache.offset - n)
        if cache.capacity < need:  # grown geometrically: a long conversation is copied O(log n) times
            longest = model.config.max_position_embeddings
            cache = cache.moved(model.make_cache(min(longest, max(need, 2 * cache.capacity))))
        return prefill(model, prompt, max_new_tokens, cache, n), n

    def hold(self, model: DecoderLM, cache: KVCache, ctx: list[int]) -> None:
        """Keep a finished request's cache. Position i holds ctx[i] for every i below both the cache's offset
        and len(ctx): accepted drafts are emitted tokens, and a stop or length cut only shortens the tail."""
        n = min(cache.offset, len(ctx))
        cache.trim(cache.offset - n)
        self.model, self.tokens, self.cache = model, list(ctx[:n]), cache


def generate(
    model: DecoderLM,
    prompt: list[int],
    params: SamplingParams,
    drafter: Drafter | None = None,
    cost: CostModel | None = None,
    prefilled: Prefilled | None = None,
    prompt_cache: PromptCache | None = None,
) -> Iterator[Step]:
    """Yield `Step`s until a stop token, `max_new_tokens`, or the context is full. With `prefilled` (from
    `prefill` on the same prompt), decoding starts from a copy of its cache rather than running the prompt.
    With `prompt_cache` (a conversation's), it reuses the prefix that cache shares with the prompt, and leaves
    this request's cache there for the next one."""
    if prefilled is not None and prompt_cache is not None:
        raise SkipjackError("give a request either a prefilled prompt or a prompt cache, not both")
    ran = len(prompt)  # prompt tokens this request runs through the model
    if prefilled is not None:
        start, ran = _reuse(model, prompt, params.max_new_tokens, prefilled), 0
    elif prompt_cache is not None:
        start, reused = prompt_cache.start(model, prompt, params.max_new_tokens)
        ran -= reused
    else:
        start = prefill(model, prompt, params.max_new_tokens)
    cache = start.cache
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    vocab = model.lm_head.out_features
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(vocab, dtype=torch.bool)  # [V]
        seen[torch.tensor(prompt)] = True

    def pick(logits: torch.Tensor) -> int:  # logits [V] -> next token
        if seen is not None:
            logits = penalize(logits[None], seen[None], params.repetition_penalty)[0]
        if params.greedy:
            return int(logits.argmax())
        return sample(probs(logits[None], params)[0], gen)

    ctx = list(prompt)
    left = params.max_new_tokens
    if drafter is not None:
        drafter.begin(list(prompt))
        if cost is None and not drafter.fixed_length:
            cost = cost_model(model)
    try:
        step = Step([pick(start.logits)], forward_tokens=ran)
        while True:
            step, left = _finish(step, params, left, cache.capacity_left(), ctx, seen)
            yield step
            if step.finish:
                return
            pending = ctx[-1]
            proposal = None
            if drafter is not None:
                budget = min(MAX_DRAFT, left - 1, cache.capacity_left() - 2)
                if drafter.fixed_length:
                    budget = min(budget, drafter.fixed_length)
                elif cost is not None:
                    budget = min(budget, cost.max_useful(MAX_DRAFT, cache.offset))
                proposal = drafter.propose(ctx, budget) if budget > 0 else None
                if proposal is not None:
                    proposal = proposal.prefix(min(budget, proposal.valid_length(vocab)))
                if proposal is not None and not drafter.fixed_length and proposal.scores is not None:
                    proposal = proposal.prefix(cost.best_size(proposal.scores, cache.offset))
            if not proposal:
                at, t = cache.offset, time.perf_counter()
                logits = model(torch.tensor([[pending]]), cache).logits[0, -1]
                step = Step([pick(logits)])
                if cost is not None:
                    cost.observe(1, time.perf_counter() - t, at)
                if proposal is not None:  # drafted but sized down to nothing: still a lesson for the drafter
                    drafter.observe(step.tokens, proposal)
                continue
            at, t = cache.offset, time.perf_counter()
            step = _speculate(model, cache, pending, proposal, params, gen, seen)
            if cost is not None:
                cost.observe(step.forward_tokens, time.perf_counter() - t, at)
            drafter.observe(step.tokens, proposal)
    except GeneratorExit:  # closed between steps (a stop string, a client gone): the cache is whole
        raise
    except BaseException:  # a forward may have stopped half way through the layers
        prompt_cache = None
        raise
    finally:
        if drafter is not None:
            drafter.end()
        if prompt_cache is not None:
            prompt_cache.hold(model, cache, ctx)


def _speculate(model, cache, pending, proposal: Proposal, params, gen, seen) -> Step:
    start = cache.offset
    chain = proposal.is_chain
    positions = start + torch.tensor([0] + proposal.depths())  # [T]
    mask = None if chain else tree_mask(proposal.parents)  # [T, T]
    ids = torch.tensor([[pending] + proposal.tokens])  # [1, T]
    logits = model(ids, cache, positions=positions, tree_mask=mask).logits[0]  # [T, V]
    verdict = verify(logits, proposal, params, gen, seen)
    proposal.path, proposal.predicted = verdict.path, verdict.argmax  # what the drafter learns from
    if chain:
        cache.trim(len(proposal) - len(verdict.path))
    else:
        cache.keep(start, [0] + [c + 1 for c in verdict.path])
    return Step(verdict.tokens, drafted=len(proposal), accepted=len(verdict.path), forward_tokens=len(ids[0]))


def _finish(step: Step, params: SamplingParams, left: int, room: int, ctx: list[int], seen) -> tuple[Step, int]:
    """Apply stop tokens, the token budget and the context limit to a step; extend the context."""
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
    ctx.extend(toks)
    if seen is not None and toks:
        seen[torch.tensor(toks)] = True
    return step, left - len(toks)


PRIOR_FORMAT = 2  # bump when the prior's measurement changes: older cached priors are then ignored
_COSTS: weakref.WeakKeyDictionary[DecoderLM, CostModel] = weakref.WeakKeyDictionary()


def cost_model(model: DecoderLM, remeasure: bool = False) -> CostModel:
    """The model's cost model, one per model object in this process. Its measured prior (several seconds of
    forwards) is cached on disk per architecture and machine (`prior_path`) and reused by later processes;
    `remeasure` measures it afresh (the benchmark does, so its prior reflects the run's conditions)."""
    if model not in _COSTS or remeasure:
        padding.tune(model)  # the prior is measured with the row padding in place
        path = prior_path(model)
        cm = None if remeasure else _read_prior(path)
        if cm is None:
            cm = CostModel.measure(model)
            write_atomic(path, json.dumps(cm.prior_json()))
        _COSTS[model] = cm
    return _COSTS[model]


def prior_path(model: DecoderLM) -> Path:
    """Where the measured prior is cached: keyed by what the cost depends on (the architecture and dtype, the
    CPU, torch's threads and version, the weight layout and its row padding), never by the weights' values."""
    from skipjack.models.common import _PACK

    return cache_file(
        "costs",
        {
            "config": dataclasses.asdict(model.config),
            "dtype": str(model.dtype),
            "cpu": cpu_name(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "packed": _PACK,
            "pads": padding.tuned(model),
            "format": PRIOR_FORMAT,
        },
    )


def _read_prior(path: Path) -> CostModel | None:
    try:
        return CostModel.from_prior_json(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None  # missing or unreadable: measured again and rewritten


def learned_cost_model(model: DecoderLM) -> CostModel | None:
    """The model's cost model if this process built one (what it has learned so far), else None."""
    return _COSTS.get(model)
