"""`triforce` (TriForce-style lossless speculation: the model drafting over a StreamingLLM cache filled from the
target's verified keys): token-identical to plain full-cache greedy decoding, property-based on tiny q4 models
(any prompt, budget, window, draft size), on a real model at a long prompt, and refused where it cannot run."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import hf_model, ours_from_hf
from drafters_mock import decode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skipjack.decoding.sampling import SamplingParams
from skipjack.errors import SkipjackError


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(
        hf_model("llama", seed=4, vocab=48, num_hidden_layers=3, max_position_embeddings=1024), weights="q4"
    )


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny passes: threads only add overhead on a busy machine
    yield
    torch.set_num_threads(old)


@settings(max_examples=16, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(20, 300),
    budget=st.sampled_from([0.02, 0.1, 0.3, 1.0]),
    least=st.sampled_from([1, 8, 64]),
    k=st.sampled_from([0, 1, 4]),
)
def test_triforce_is_plain_greedy(model, seed, n, budget, least, k):
    rng = random.Random(seed)
    base = [rng.randrange(48) for _ in range(n)]
    prompt = base + base[: n // 3]  # repeats, so drafts get accepted too
    params = SamplingParams(max_new_tokens=40)
    plain, _ = decode(model, prompt, params)
    spec = f"triforce:budget={budget},least={least}" + (f",k={k}" if k else "")
    tokens, steps = decode(model, prompt, params, spec)
    assert tokens == plain
    assert sum(s.drafted for s in steps) > 0  # it drafted


def test_triforce_draft_cache_is_small_and_exact(model):
    """The draft cache holds the sinks and the window, and those keys are the target's own."""
    from skipjack.decoding.proposal import DraftContext
    from skipjack.decoding.session import prefill
    from skipjack.drafters.base import Resources
    from skipjack.drafters.triforce import TriForce
    from skipjack.kvpolicies.base import EvictingLayerKV

    prompt = [random.Random(1).randrange(48) for _ in range(400)]
    start = prefill(model, prompt, 16)
    t = TriForce(budget=0.1, least=8)
    t.prepare(Resources(model=model))
    s = t.session()
    s.begin(prompt)
    s.propose(DraftContext(prompt + [int(start.logits.argmax())], 4, model, start.cache))
    assert s.held.tokens == prompt and s.held.cache.offset == len(prompt)  # the draft's own keys are gone
    for draft, full in zip(s.held.cache, start.cache):
        assert isinstance(draft, EvictingLayerKV) and draft.n == 4 + 40 - 1  # sinks + the window (up to the pending)
        pos = draft.pos[0, : draft.n]
        assert torch.equal(draft.k[0, :, : draft.n], full.k[0, :, pos])  # copied, not recomputed


def test_triforce_refused_with_a_cache_policy(tiny_folder):
    from skipjack.engine import Engine, Request

    e = Engine.load(str(tiny_folder), "q4", tune=False)
    ids = e.tokenizer.prompt_ids("hello world", raw=True)
    for kv in ("snapkv:budget=0.5", "int8"):
        with pytest.raises(SkipjackError, match="triforce (reads|copies the target's) cached keys"):
            e.complete(Request(ids, SamplingParams(max_new_tokens=4), "triforce", kv=kv))


@pytest.mark.real
def test_triforce_on_the_real_model_at_a_long_prompt():
    """SmolLM2 q4 (batch-invariant): a 1.5k-token prompt, greedy; triforce's tokens are plain decoding's."""
    from skipjack.engine import Engine, Request
    from skipjack.evaluation import longctx
    from skipjack.loading.load import DEFAULT_MODEL

    e = Engine.load(DEFAULT_MODEL, "q4")
    task = longctx.make_tasks(e.tokenizer, 1536, seed=2, kinds=("niah_single",), haystacks=("text",))[0]
    params = SamplingParams(max_new_tokens=48, stop_token_ids=frozenset())
    plain = e.complete(Request(task.prompt, params, "plain"))
    tri = e.complete(Request(task.prompt, params, "triforce:budget=0.1"))
    assert tri.tokens == plain.tokens and tri.draft_steps > 0
