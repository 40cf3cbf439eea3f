"""Multi-turn prompt caching (`decoding.session.Session`, take-over): each turn reuses the conversation's cache,
runs only what it does not hold, and decodes exactly as a request that runs its whole prompt."""

from __future__ import annotations

import pytest
import torch
from drafters_mock import AlwaysAccept
from drafters_mock import decode as run
from test_cache import assert_same_cache

from skipjack.cache import common_prefix
from skipjack.decoding.plan import Plan
from skipjack.decoding.sampling import SamplingParams
from skipjack.decoding.sequence import generate
from skipjack.decoding.session import Session
from skipjack.drafters.base import Drafter, DraftSession
from skipjack.errors import SkipjackError

GREEDY = SamplingParams(max_new_tokens=12)
SAMPLED = SamplingParams(max_new_tokens=12, temperature=0.9, seed=7)


def decode(model, prompt, params, method="plain", prompt_cache=None):
    return run(model, prompt, params, method, session=prompt_cache)


def assert_holds_what_it_says(model, pc: Session):
    """The cache equals a fresh prefill of the tokens it claims to hold."""
    fresh = model.make_cache(pc.cache.capacity)
    model(torch.tensor([pc.tokens]), fresh)
    assert_same_cache(pc.cache, fresh, atol=1e-10)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_a_conversation_reuses_its_cache_turn_after_turn(tiny_llama64, sliding_gemma64, family):
    """Five turns, each prompt = the conversation so far + a new message (one long enough that the cache must
    grow). Every turn's tokens equal a fresh request's (greedy for each method, and seeded sampling); it runs
    only the prompt tokens after the prefix the cache holds; and the cache left behind equals a fresh prefill
    of the tokens it holds. The Gemma conversation starts past its sliding layers' buffer, so they evict."""
    model = tiny_llama64 if family == "llama" else sliding_gemma64
    g = torch.Generator().manual_seed(1)
    words = lambda n: torch.randint(0, 48, (n,), generator=g).tolist()  # noqa: E731
    convo = words(20 if family == "llama" else 300)
    pc, capacities = Session(), set()
    turns = [
        ("plain", GREEDY, 6),
        ("pld", GREEDY, 90),
        ("ngram", GREEDY, 5),
        ("plain", SAMPLED, 8),
        ("pld", SAMPLED, 3),
    ]
    for i, (method, params, message) in enumerate(turns):
        fresh, _ = decode(model, convo, params, method)
        held = list(pc.tokens)
        out, steps = decode(model, convo, params, method, prompt_cache=pc)
        assert out == fresh, (i, method)
        n = common_prefix(held, convo[:-1])
        assert (n > 0) == (i > 0) and steps[0].forward_tokens == len(convo) - n
        assert len(pc.tokens) >= len(convo)
        assert pc.tokens == (convo + out)[: len(pc.tokens)]
        assert_holds_what_it_says(model, pc)
        capacities.add(pc.cache.capacity)
        convo = convo + out + words(message)
    assert len(capacities) > 1  # the cache grew, keeping what it held
    assert family == "llama" or any(getattr(layer, "first", 0) > 0 for layer in pc.cache)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_a_prompt_that_leaves_the_conversation_early(tiny_llama64, sliding_gemma64, family):
    """A prompt sharing only 3 tokens with the cache: a full-attention cache keeps those 3; a sliding layer has
    already dropped keys the new tokens need, so the request runs its whole prompt. Both decode exactly."""
    model = tiny_llama64 if family == "llama" else sliding_gemma64
    g = torch.Generator().manual_seed(2)
    first = torch.randint(0, 48, (280,), generator=g).tolist()
    pc = Session()
    decode(model, first, GREEDY, prompt_cache=pc)
    other = first[:3] + [(t + 1) % 48 for t in first[3:40]]
    out, steps = decode(model, other, GREEDY, "pld", prompt_cache=pc)
    assert out == decode(model, other, GREEDY)[0]
    kept = 3 if family == "llama" else 0
    assert steps[0].forward_tokens == len(other) - kept
    assert_holds_what_it_says(model, pc)


def test_a_stop_inside_a_verify_step_is_not_held(tiny_llama64):
    """Drafts accepted past a stop token have keys in the cache, but they are not in the conversation: the
    cache keeps exactly the prompt and the output."""
    prompt = [4, 5, 6, 7] * 5
    free, _ = decode(tiny_llama64, prompt, SamplingParams(max_new_tokens=20))
    stop = free[6]
    params = SamplingParams(max_new_tokens=20, stop_token_ids=frozenset({stop}))
    pc = Session()
    out, steps = decode(tiny_llama64, prompt, params, AlwaysAccept(tiny_llama64), prompt_cache=pc)
    assert steps[-1].finish == "stop" and steps[-1].accepted > len(steps[-1].tokens)  # the stop cut a step
    assert out == free[: free.index(stop)] and pc.tokens == prompt + out
    assert_holds_what_it_says(tiny_llama64, pc)


def test_the_same_prompt_again_runs_one_token(tiny_llama64):
    """Regenerating: the cache holds the whole prompt, and only its last token runs (for its logits)."""
    prompt = [5, 6, 7, 8, 5, 6, 7, 9] * 3
    pc = Session()
    first, _ = decode(tiny_llama64, prompt, GREEDY, prompt_cache=pc)
    again, steps = decode(tiny_llama64, prompt, GREEDY, "ngram", prompt_cache=pc)
    assert again == first and steps[0].forward_tokens == 1


def test_another_model_or_a_failed_request_starts_afresh(tiny_llama64, tiny_gemma64):
    prompt = [3, 4, 5, 6, 7] * 4
    pc = Session()
    decode(tiny_llama64, prompt, GREEDY, prompt_cache=pc)
    out, steps = decode(tiny_gemma64, prompt, GREEDY, prompt_cache=pc)  # not this model's keys
    assert steps[0].forward_tokens == len(prompt) and out == decode(tiny_gemma64, prompt, GREEDY)[0]
    held = list(pc.tokens)
    with pytest.raises(SkipjackError, match="empty"):  # bad input is refused before the cache is touched
        decode(tiny_gemma64, [], GREEDY, prompt_cache=pc)
    assert pc.tokens == held

    class Broken(Drafter, DraftSession):
        name = "broken"

        def session(self):
            return self

        def propose(self, ctx):
            raise RuntimeError("drafter failed")

    with pytest.raises(RuntimeError, match="drafter failed"):
        decode(tiny_gemma64, prompt, GREEDY, Broken(), prompt_cache=pc)
    assert pc.cache is None and pc.tokens == []  # a failed request leaves nothing half written behind
    assert decode(tiny_gemma64, prompt, GREEDY, prompt_cache=pc)[1][0].forward_tokens == len(prompt)


def test_a_request_closed_early_leaves_a_whole_cache(tiny_llama64):
    """A client that stops reading (a stop string, a dropped connection) closes the generator between steps."""
    prompt = [9, 8, 7, 6, 5] * 4
    pc = Session()
    steps = generate(tiny_llama64, prompt, SamplingParams(max_new_tokens=30), Plan(session=pc))
    got = [t for _, s in zip(range(4), steps) for t in s.tokens]
    steps.close()
    assert pc.tokens == (prompt + got)[: len(pc.tokens)] and len(pc.tokens) >= len(prompt) + 3
    assert_holds_what_it_says(tiny_llama64, pc)


def test_a_prefilled_session_is_copied_from_never_taken_over(tiny_llama64):
    """A prefilled session (copy-from) keeps its prompt and cache after requests, where a conversation's
    session (take-over) would hold the request's output."""
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    pre = Session.prefilled(tiny_llama64, prompt, 12)
    cache, offset = pre.cache, pre.cache.offset
    for method in ("plain", "pld"):
        out, steps = decode(tiny_llama64, prompt, GREEDY, method, prompt_cache=pre)
        assert out == decode(tiny_llama64, prompt, GREEDY)[0] and steps[0].forward_tokens == 0
    assert pre.tokens == prompt and pre.cache is cache and cache.offset == offset
