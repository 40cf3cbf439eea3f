"""Automatic prefix caching across requests (issue 37, `decoding.prefix`): a request whose prompt begins with
an earlier request's tokens copies their keys and values, runs only the rest, and decodes exactly as a fresh
request (greedy, bitwise at q4; every method); entries are dropped when covered and evicted least recently used
under the memory budget; the server reports `usage.prompt_tokens_details.cached_tokens`."""

from __future__ import annotations

import httpx
import pytest
from conftest import tiny_engine
from drafters_mock import AlwaysAccept, decode
from test_server import running

from skipjack.decoding.prefix import PrefixCache, allocated
from skipjack.decoding.sampling import SamplingParams
from skipjack.server.app import Settings, create_app

BASE = [3, 9, 4, 22, 17, 5, 30, 11, 8, 2, 41, 7, 19, 26, 13, 6, 33, 12, 1, 28]  # 20 tokens
GREEDY = SamplingParams(max_new_tokens=10)


@pytest.mark.parametrize("method", ["plain", "pld", "ngram", "always"])
def test_a_reused_prefix_decodes_as_a_fresh_prompt(tiny_llama_q4, method):
    model = tiny_llama_q4
    m = AlwaysAccept(model) if method == "always" else method
    pool = PrefixCache(64 << 20)
    first, steps = decode(model, BASE, GREEDY, m, session=pool.session())
    assert steps[0].forward_tokens == len(BASE) and len(pool.entries) == 1
    for tail in ([5, 6], first[:4] + [9], [44]):  # a new turn; the earlier answer and more; one token
        prompt = BASE + tail
        fresh, _ = decode(model, prompt, GREEDY, m)
        again, steps = decode(model, prompt, GREEDY, m, session=pool.session())
        assert again == fresh
        reused = len(prompt) - steps[0].forward_tokens
        assert reused >= len(BASE) - 1 and steps[0].forward_tokens >= 1
    assert pool.hits == 3 and pool.misses == 1


def test_short_matches_and_other_models_miss(tiny_llama_q4, tiny_gemma_q4):
    pool = PrefixCache(64 << 20, min_tokens=16)
    decode(tiny_llama_q4, BASE, GREEDY, session=pool.session())
    _, steps = decode(tiny_llama_q4, BASE[:10] + [1, 2, 3], GREEDY, session=pool.session())
    assert steps[0].forward_tokens == 13  # 10 common tokens: under min_tokens
    _, steps = decode(tiny_gemma_q4, BASE + [1], GREEDY, session=pool.session())
    assert steps[0].forward_tokens == 21  # another model's entry is never used
    assert pool.hits == 0 and pool.misses == 3  # the first request's too


def test_covered_entries_go_and_the_budget_evicts_the_least_recent(tiny_llama_q4):
    model = tiny_llama_q4
    pool = PrefixCache(1 << 30)
    first, _ = decode(model, BASE, GREEDY, session=pool.session())
    decode(model, BASE + first + [5, 6], GREEDY, session=pool.session())  # the conversation's next turn
    assert len(pool.entries) == 1  # the first request's sequence is a prefix of the second's: dropped
    one = allocated(next(iter(pool.entries.values()))[1].cache)
    pool = PrefixCache(int(2.5 * one))
    others = [[(t * 7 + k) % 48 for t in BASE] for k in (1, 2, 3)]
    for p in others:
        decode(model, p, GREEDY, session=pool.session())
    assert len(pool.entries) == 2 and pool.evictions == 1 and pool.nbytes <= pool.budget
    _, steps = decode(model, others[0] + [1], GREEDY, session=pool.session())
    assert steps[0].forward_tokens == 21  # the oldest was evicted
    _, steps = decode(model, others[2] + [1], GREEDY, session=pool.session())
    assert steps[0].forward_tokens < 21  # the newest is there
    tiny = PrefixCache(one // 2)
    decode(model, BASE, GREEDY, session=tiny.session())
    assert not tiny.entries  # larger than the whole budget: not kept


def test_the_server_reports_cached_tokens_and_answers_the_same(tmp_path):
    msgs = [{"role": "system", "content": "You answer briefly. " * 6}, {"role": "user", "content": "hello there"}]
    with tiny_engine(tmp_path / "home") as e:
        answers = {}
        for mb in (64, 0):
            with running(create_app(Settings(method="pld", prefix_cache_mb=mb), e)) as u:
                turn, got = list(msgs), []
                for _ in range(2):
                    r = httpx.post(
                        f"{u}/v1/chat/completions", json={"messages": turn, "max_tokens": 8, "temperature": 0}
                    )
                    body = r.json()
                    got.append((body["choices"][0]["message"]["content"], body["usage"]))
                    turn = turn + [{"role": "assistant", "content": got[-1][0]}, {"role": "user", "content": "more"}]
                answers[mb] = got
    (a1, u1), (a2, u2) = answers[64]
    assert u1["prompt_tokens_details"]["cached_tokens"] == 0
    assert u2["prompt_tokens_details"]["cached_tokens"] > u1["prompt_tokens"] // 2
    assert [a for a, _ in answers[0]] == [a1, a2]  # the same answers with the cache off
    assert all(u["prompt_tokens_details"]["cached_tokens"] == 0 for _, u in answers[0])


@pytest.mark.real
def test_real_model_reuse_is_bitwise_at_q4():
    import pydoc_data.topics

    from skipjack.engine import Engine, Request
    from skipjack.loading.load import DEFAULT_MODEL

    e = Engine.load(DEFAULT_MODEL)
    tok = e.tokenizer
    system = {"role": "system", "content": pydoc_data.topics.topics["assert"][:1500]}
    first = tok.prompt_ids([system, {"role": "user", "content": "What does assert do?"}])
    params = SamplingParams(max_new_tokens=24, stop_token_ids=tok.stop_ids)
    pool = PrefixCache(256 << 20)
    for method in ("plain", "pld"):
        e.complete(Request(first, params, method, session=pool.session()))
        second = tok.prompt_ids([system, {"role": "user", "content": "When is it removed?"}])
        fresh = e.complete(Request(second, params, method))
        reused = e.complete(Request(second, params, method, session=pool.session()))
        assert reused.tokens == fresh.tokens and reused.prompt_tokens == fresh.prompt_tokens
    assert pool.hits >= 2
