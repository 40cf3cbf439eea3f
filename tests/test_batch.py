"""Continuous batching (`skipjack.decoding.batch`, `Engine.generate_batch`, `Engine.runner`): on q4 (a batch-invariant
forward) every request's greedy tokens in a batch equal its tokens alone, whatever the mix of methods, prompt
lengths and output lengths; requests join and leave between steps; the ragged pass equals separate passes."""

from __future__ import annotations

import pytest
import torch
from conftest import byte_bpe_tokenizer, hf_model, ours_from_hf

from skipjack.decoding.batch import MAX_ROWS, Batch, BatchCost
from skipjack.decoding.cost import CostModel
from skipjack.decoding.proposal import Proposal
from skipjack.decoding.sampling import SamplingParams
from skipjack.engine import Engine, Request
from skipjack.loading.load import Loaded
from skipjack.loading.tokenizer import Tokenizer
from skipjack.models.common import Segment


def _engine(family: str) -> Engine:
    tok = byte_bpe_tokenizer()
    n = 4 if family == "llama" else 3
    m = ours_from_hf(
        hf_model(family, seed=3, vocab=len(tok), max_position_embeddings=256, num_hidden_layers=n), weights="q4"
    )
    return Engine(Loaded(m, Tokenizer(tok, tok.chat_template, tok.eos_token_id), family, None, 0, False))


@pytest.fixture(scope="module", params=["llama", "gemma3_text", "qwen2-sw"])
def engine(request):
    return _engine(request.param)


PROMPTS = [
    [5, 6, 7, 8, 5, 6, 7, 8, 5, 6],
    [9, 10, 11],
    [12, 13, 14, 12, 13, 14, 12, 13],
    [20] * 5,
    [30, 31, 32, 33, 34, 35],
    [40, 41, 40, 41, 40, 41, 40],
]


def _req(p, n, method, temperature=0.0, seed=None):
    return Request(list(p), SamplingParams(max_new_tokens=n, temperature=temperature, seed=seed), method)


@pytest.mark.parametrize(
    "methods",
    [
        ["plain"],
        ["plain", "pld", "ngram", "pld:k=3", "auto", "lookahead"],
        ["swift:skip=a1+f1", "del", "pld", "plain", "lookahead:k=8"],
    ],
)
def test_batched_greedy_equals_alone(engine, methods):
    reqs = [(p, 6 + 3 * i, methods[i % len(methods)]) for i, p in enumerate(PROMPTS * 2)]
    alone = [engine.complete(_req(*r)).tokens for r in reqs]
    batched = engine.generate_batch([_req(*r) for r in reqs])
    assert [b.tokens for b in batched] == alone
    assert all(b.finish == "length" for b in batched)


def test_batched_sampling_is_seeded_like_alone(engine):
    """Seeded sampling: a sequence's draws come from its own generator, so batching does not change them where
    the drafts are the same (a fixed k; cost-sized drafts may differ in a batch, and so the draws, not the
    distribution: rejection sampling is exact for any draft length, see test_verify)."""
    reqs = [(p, 10, "pld:k=3", 0.9, 100 + i) for i, p in enumerate(PROMPTS)]
    alone = [engine.complete(_req(*r)).tokens for r in reqs]
    assert [b.tokens for b in engine.generate_batch([_req(*r) for r in reqs])] == alone


def test_requests_join_and_leave_between_steps(engine):
    runner = engine.runner()
    first = runner.add(_req(PROMPTS[0], 60, "pld"))
    got = {id(first): list(first.first.tokens)}
    late = None
    for i in range(200):
        if i == 1:
            late = runner.add(_req(PROMPTS[1], 8, "ngram"))  # joins a running batch
            got[id(late)] = list(late.first.tokens)
        if i == 2:
            gone = runner.add(_req(PROMPTS[2], 30, "plain"))
            runner.drop(gone)  # a client gone: leaves at once
            assert gone.seq not in runner.batch.live
        for h, _, step in runner.step():
            got[id(h)].extend(step.tokens)
        if not runner.busy():
            break
    assert not runner.busy() and not runner.handles
    assert got[id(first)] == engine.complete(_req(PROMPTS[0], 60, "plain")).tokens
    assert got[id(late)] == engine.complete(_req(PROMPTS[1], 8, "plain")).tokens


def test_ragged_pass_equals_separate_passes(engine):
    m = engine.model
    caches = [m.make_cache(64) for _ in range(3)]
    for c, p in zip(caches, PROMPTS):
        m(torch.tensor([p]), c)
    twins = [m.make_cache(64) for _ in range(3)]
    for c, p in zip(twins, PROMPTS):
        m(torch.tensor([p]), c)
    news = [[3], [4, 5, 6], [7, 8]]
    outs = m.forward_batch([Segment(torch.tensor([n]), c) for n, c in zip(news, caches)])
    for o, n, c in zip(outs, news, twins):
        assert torch.equal(o.logits, m(torch.tensor([n]), c).logits)
    assert [c.offset for c in caches] == [c.offset for c in twins]


def test_batch_caps_rows_and_drafts(engine):
    """With B sequences each drafts at most MAX_ROWS // B - 1 nodes: the pass stays within the kernels' width."""
    batch = Batch(engine.model, rows=8)
    from skipjack.decoding.sequence import Sequence

    seqs = []
    for p in PROMPTS[:4]:
        plan = engine.plan(Request(p * 3, SamplingParams(max_new_tokens=20), engine.new_method("pld:k=16")))
        s = Sequence(engine.model, plan, p * 3, SamplingParams(max_new_tokens=20))
        batch.add(s)
        seqs.append(s)
    seen = set()
    while batch.live:
        live = len(batch.live)
        widths = [st.forward_tokens for _, st in batch.step()]
        seen.add(live)
        if live > 1:
            assert max(widths) <= 8 // live and sum(widths) <= 8
    assert 4 in seen and MAX_ROWS == 65


@pytest.mark.parametrize("method", ["del:exit=1", "pld"])
def test_a_draft_sized_to_nothing_is_a_plain_step(engine, method):
    """p_min = 1 cuts every draft to nothing after it was drafted (a resuming drafter's too): plain steps, the
    same tokens as plain, alone and batched."""
    plain = [engine.complete(_req(p, 12, "plain")).tokens for p in PROMPTS[:3]]
    reqs = [Request(list(p), SamplingParams(max_new_tokens=12), method, draft_p_min=1.0) for p in PROMPTS[:3]]
    assert [engine.complete(r).tokens for r in reqs] == plain
    reqs = [Request(list(p), SamplingParams(max_new_tokens=12), method, draft_p_min=1.0) for p in PROMPTS[:3]]
    assert [r.tokens for r in engine.generate_batch(reqs)] == plain


def _chain(*scores):
    return Proposal.chain(list(range(len(scores))), list(scores))


def test_batch_cost_keeps_every_node_when_rows_are_free_and_none_when_they_cost_their_weight():
    free = BatchCost(CostModel.flat())
    props = [_chain(0.9, 0.5, 0.1), None, _chain(0.3)]
    assert free.choose(props, 100) == [3, 0, 1]
    linear = BatchCost(CostModel((1, 64), (1.0, 64.0)))  # every row costs as much as a plain step
    assert linear.choose(props, 100) == [0, 0, 0]


def test_batch_cost_takes_nodes_best_score_first_across_sequences():
    bc = BatchCost(CostModel.flat())
    for extra, t in [(0, 1.0), (1, 1.0), (2, 1.1), (3, 1.5), (4, 2.0)]:  # a knee after 2 extra rows
        bc.observe(2, extra, t)
    # B = 2: (2 + 0.9 + 0.8) / 1.1 beats adding 0.2 at 1.5; the nodes taken are the two best, one per sequence
    assert bc.choose([_chain(0.9, 0.2), _chain(0.8, 0.1)], 100) == [1, 1]
    # a fixed-size draft (the user's k) is verified whole, and its rows count
    assert bc.choose([_chain(0.9, 0.2), _chain(0.8, 0.1)], 100, fixed=[True, False]) == [2, 1]  # 2.8 / 1.5 > 2 / 1.1


def test_batch_cost_turns_drafting_down_as_the_batch_grows():
    """With a measured curve whose cost per row grows with the pass's rows (a CPU past its bandwidth-bound
    region), the same draft pays alone and not in a wide batch."""
    bc = BatchCost(CostModel((1, 2, 4, 8, 16, 32), (1.0, 1.05, 1.15, 1.6, 3.0, 6.0)))
    one = bc.choose([_chain(0.6, 0.5)], 100)
    wide = bc.choose([_chain(0.6, 0.5)] * 16, 100)
    assert one == [2] and wide == [0] * 16


def test_batch_cost_weighs_each_sequence_by_its_trust_in_its_scores():
    bc = BatchCost(CostModel.flat())
    for extra, t in [(0, 1.0), (1, 1.3), (2, 1.6)]:  # every row costs 0.3 of the pass
        bc.observe(2, extra, t)
    props = [_chain(0.9), _chain(0.9)]
    assert bc.choose(props, 100) == [1, 1]  # (2 + 1.8) / 1.6 > 2 / 1
    assert bc.choose(props, 100, trust=[1.0, 0.1]) == [1, 0]  # the second's 0.9 is worth 0.09: not a row


def test_batch_cost_pauses_drafting_after_steps_that_lose():
    """Drafting costs time even when nothing drafted is verified: after n drafting steps in a row at one width
    that lost, that width drafts again only after 2^n - 1 steps (at most MAX_PAUSE); a win resets it."""
    bc = BatchCost()
    pattern = []
    for _ in range(12):
        go = bc.drafts(3)
        pattern.append(go)
        if go:
            bc.outcome(3, True, kept=False, drafted=True, tokens=3, seconds=0.01)  # drafted, nothing kept
    assert pattern == [True, False, True, False, False, False, True] + [False] * 5
    assert bc.drafts(2)  # another width keeps its own count
    bc.outcome(3, True, kept=True, drafted=True, tokens=5, seconds=0.01)
    assert bc.idle[3] == (0, 0)
    for _ in range(20):
        bc.outcome(4, True, kept=False, drafted=True, tokens=4, seconds=0.01)
    assert bc.idle[4][1] == BatchCost.MAX_PAUSE
    bc.outcome(5, True, kept=False, drafted=False, tokens=5, seconds=0.01)  # nothing proposed: nothing learned
    assert bc.drafts(5)


def test_drafting_steps_slower_than_plain_ones_lose_even_when_their_drafts_are_verified():
    """Whole steps are timed with and without drafting (tokens per second, per width): a cost model that
    underrates the verify rows cannot keep a losing drafter on."""
    slow, fast = BatchCost(), BatchCost()
    for bc in (slow, fast):
        for _ in range(3):
            bc.outcome(4, False, kept=False, drafted=False, tokens=4, seconds=0.010)  # plain: 400 tok/s
    for _ in range(3):
        slow.outcome(4, True, kept=True, drafted=True, tokens=5, seconds=0.020)  # 250 tok/s
        fast.outcome(4, True, kept=True, drafted=True, tokens=6, seconds=0.012)  # 500 tok/s
    assert slow.idle[4][0] == 1 and not slow.drafts(4)  # the third drafting step made it count: a loss
    assert fast.idle.get(4, (0, 0)) == (0, 0) and fast.drafts(4)


def test_every_probe_th_step_is_plain_so_the_comparison_stays_fresh():
    bc = BatchCost()
    asks = [bc.drafts(6) for _ in range(3 * BatchCost.PROBE)]
    assert [i + 1 for i, a in enumerate(asks) if not a] == [BatchCost.PROBE * k for k in (1, 2, 3)]


def test_a_paused_batch_still_verifies_a_fixed_k_and_gives_plain_tokens(engine):
    """While paused, cost-sized sequences skip drafting but `k` sequences draft as the user asked; the tokens
    are plain decoding's either way."""
    cost = engine.batch_cost
    saved = dict(cost.idle)
    try:
        plain = [engine.complete(_req(p, 10, "plain")).tokens for p in PROMPTS[:4]]
        reqs = [_req(p, 10, m) for p, m in zip(PROMPTS[:4], ["pld", "pld:k=3", "auto", "ngram"])]
        reqs[1].prompt = list(PROMPTS[0])
        cost.idle.update({b: (5, 10**6) for b in range(2, 5)})  # paused for good at every width this batch has
        out = engine.generate_batch(reqs)
        plain[1] = engine.complete(_req(PROMPTS[0], 10, "plain")).tokens
        assert [r.tokens for r in out] == plain
        assert [r.draft_seconds > 0 for r in out] == [False, True, False, False]  # only k was asked to draft
        assert [r.draft_steps for r in out][::2] == [0, 0]
    finally:
        cost.idle.clear()
        cost.idle.update(saved)


def test_auto_is_the_fastest_lossless_method_cost_sized():
    from skipjack.errors import SkipjackError
    from skipjack.methods import AUTO, MethodSpec

    m = MethodSpec.parse("auto")
    assert m == MethodSpec.parse(AUTO) and m.name == AUTO and m.lossless and not m.k
    assert m.identical_to_plain("q4")
    with pytest.raises(SkipjackError, match="takes no options"):
        MethodSpec.parse("auto:k=3")
    e = _engine("llama")
    seeded = Request([5, 6], SamplingParams(max_new_tokens=4, temperature=1.0, seed=3), "auto")
    assert e.plan(seeded).draft is None and seeded.method == "plain"  # a seed's draws must repeat
    for params in (SamplingParams(max_new_tokens=4), SamplingParams(max_new_tokens=4, temperature=1.0)):
        r = Request([5, 6], params, "auto")
        assert e.check(r).name == AUTO and e.plan(r).draft is not None and r.method == "auto"
