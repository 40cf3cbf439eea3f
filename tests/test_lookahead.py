"""Lookahead decoding (`skipjack.drafters.lookahead`): the published 2-D window as a tree (the paper's attention
mask, positions), the n-gram pool and the window's update, the budget; greedy identity to plain decoding on
tiny random models (hypothesis), in a batch, and the law of sampled tokens (χ²); bad options are one line."""

from __future__ import annotations

import pytest
import torch
from drafters_mock import chi2_pvalue, decode, make, plan_of
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skipjack.decoding.cost import CostModel
from skipjack.decoding.proposal import DraftContext, Verdict
from skipjack.decoding.sampling import SamplingParams
from skipjack.decoding.sequence import generate
from skipjack.decoding.verify import tree_mask
from skipjack.drafters.lookahead import Lookahead
from skipjack.errors import SkipjackError
from skipjack.methods import MethodSpec


def session(tokens: list[int], **opts):
    s = Lookahead(**opts).session()
    s.begin(tokens)
    return s


def pool(s) -> dict:
    """The session's pool as key -> its n-grams, oldest first."""
    return {key: list(grams) for key, grams in s.pool.items()}


def rows(prop, argmax: list[int]) -> Verdict:
    """A verdict that accepted nothing and saw `argmax` after the root and each node."""
    assert len(argmax) == len(prop) + 1
    return Verdict([argmax[0]], [], argmax)


def cell_of(prop, levels, root):
    """Each node's window cell (level, column), told apart by their distinct tokens."""
    where = {tok: (lv, j) for lv, level in enumerate(levels) for j, tok in enumerate(level) if (lv, j) != (0, 0)}
    where[root] = (0, 0)
    return [where[t] for t in prop.tokens]


def test_the_window_is_the_papers_mask_as_a_tree():
    """W = 5, N = 4 (llama.cpp's example): level 0 a causal chain from the root; the cell at level l, column j
    sees the root, level 0's columns 1..j and its own column's levels 1..l; its position is j + l."""
    s = session([7], window=5, ngram=4, guess=2, prompt=0)
    s.levels = [[100 + 10 * lv + j for j in range(5)] for lv in range(3)]  # a full window, every token distinct
    prop = s.propose(DraftContext([1, 2, 3], budget=64))
    cells = cell_of(prop, s.levels, 3)
    assert len(prop) == 4 + 2 * 5 and sorted(cells) == sorted(
        {(0, j) for j in range(1, 5)} | {(lv, j) for lv in (1, 2) for j in range(5)}
    )
    mask = tree_mask(prop.parents)  # [T, T]: row 0 the root
    for i, (lv, j) in enumerate(cells):
        seen = {cells[k] for k in range(len(prop)) if mask[i + 1, k + 1]}
        want = {(0, c) for c in range(1, j + 1)} | {(m, j) for m in range(1, lv + 1)}
        assert seen == want and bool(mask[i + 1, 0]), (lv, j)
        assert prop.depths()[i] == j + lv


def test_ngrams_are_collected_once_full_and_the_window_shifts_one_level():
    s = session([50, 51, 52], window=3, ngram=3, guess=2, prompt=0)
    assert len(s.levels) == 1 and set(s.levels[0]) <= {50, 51, 52}  # warm-up: level 0 alone, drawn from the prompt
    s.levels = [[0, 11, 12]]  # column 0 stands for the root
    first = s.propose(DraftContext([50, 51, 52, 9], budget=64))
    assert first.tokens == [11, 12] and first.parents == [-1, 0]  # a chain from the root
    s.observe(first, rows(first, [20, 21, 22]))
    assert pool(s) == {} and s.levels == [[0, 11, 12], [20, 21, 22]]  # the new tokens are one more level
    prop = s.propose(DraftContext([50, 51, 52, 9, 8], budget=64))
    assert prop.tokens == [20, 11, 21, 12, 22] and prop.parents == [-1, -1, 1, 1, 3]  # column by column
    s.observe(prop, rows(prop, [0, 30, 0, 31, 0, 32]))  # rows after each node: the top cells are nodes 0, 2, 4
    assert pool(s) == {8: [(20, 30)], 11: [(21, 31)], 12: [(22, 32)]}  # key: the column's level 0 (the root)
    assert s.levels == [[20, 21, 22], [30, 31, 32]]  # every level shifts down one, the new tokens on top


def test_the_verification_branch_holds_the_roots_ngrams_by_worth_within_the_budget():
    s = session([], window=3, ngram=4, guess=3, prompt=0)
    for gram in [(1, 2, 3), (1, 2, 4), (5, 6, 7), (8, 9, 10)]:
        s._remember(0, gram, True)
    s._remember(0, (1, 2, 4), True)  # refreshed, not duplicated; G = 3 dropped the oldest, (1, 2, 3)
    assert pool(s)[0] == [(5, 6, 7), (8, 9, 10), (1, 2, 4)]
    prop = s.propose(DraftContext([0], budget=64))  # by worth: depth 1 (0.3), the window (0.25 a cell), deeper
    assert prop.tokens == [1, 8, 5, 0, 0, 2, 9, 6, 4, 10, 7]  # each depth: the most recent n-gram first
    assert prop.parents == [-1, -1, -1, -1, 3, 0, 1, 2, 5, 6, 7]
    assert prop.state.tops == {0: 0, 1: 4, 2: 5} and prop.state.checks[:3] == [(1,), (8,), (5,)]
    assert s.propose(DraftContext([0], budget=5)).tokens == [1, 8, 5, 0, 0]  # cut at the budget, best first
    assert len(s.propose(DraftContext([0], budget=1))) == 1


def test_the_pool_takes_the_prompts_and_outputs_ngrams():
    s = session([4, 5, 6, 4, 5, 7], window=2, ngram=3, guess=4, prompt=1)
    assert pool(s) == {4: [(5, 6), (5, 7)], 5: [(6, 4)], 6: [(4, 5)]}
    prop = s.propose(DraftContext([4, 5, 6, 4, 5, 7, 9, 4], budget=64))
    assert pool(s)[5] == [(6, 4), (7, 9)] and pool(s)[7] == [(9, 4)]  # the output's n-grams, as they are emitted
    assert prop.state.checks == [(5,), (5, 7), (5, 6)]  # one trie: the shared 5, then the most recent first
    assert prop.tokens[0] == 5 and {(7, 0), (6, 0)} <= set(zip(prop.tokens, prop.parents))


def test_the_step_is_cut_where_the_sizer_would_cut_those_worths():
    """`fit` gets every unit's worth per node, best first, and the step keeps that many nodes, whole columns
    only; `k` (a fixed size: the sizer keeps everything) runs the whole method."""
    s = session([], window=4, ngram=3, guess=2, prompt=0)
    s.levels = [[0, 11, 12, 13], [20, 21, 22, 23]]
    s._remember(7, (1, 2), True)
    s._remember(7, (3, 4), True)
    assert s.propose(DraftContext([7], budget=64, fit=lambda worths: 0)) is None
    asked = []
    four = s.propose(DraftContext([7], budget=64, fit=lambda w: asked.append(w) or 4))
    cell, deeper = s.d.cell_worth, s.d.rate(1) * s.d.rate(2)
    assert asked == [[s.d.rate(1)] * 2 + [cell] * 7 + [deeper] * 2]  # 2 first tokens, 4 columns, 2 second
    assert four.tokens == [3, 1, 20] and four.state.tops == {0: 3}  # column 1 (2 cells) would pass 4 nodes
    whole = s.propose(DraftContext([7], budget=64))
    assert len(whole) == 2 + 7 + 2 and whole.state.tops == {0: 3, 1: 5, 2: 7, 3: 9}


def test_each_sizers_fit_is_its_size_on_those_worths():
    from skipjack.decoding.sizing import Capped, CostSizer, FixedSizer, NoDraft

    mid = CostModel((1, 2, 4, 8), (1.0, 1.1, 1.3, 2.5))
    worths = [0.9, 0.8, 0.7, 0.05, 0.01]
    sizer = CostSizer(mid)
    sizer.budget(64, 100)  # the context it sizes at
    assert sizer.fit(worths) == mid.best_size(worths, 100) == 3
    assert FixedSizer(4).fit(worths) == 5 and NoDraft().fit(worths) == 0
    assert Capped(FixedSizer(8), n_max=2).fit(worths) == 2 and Capped(FixedSizer(8), 8, p_min=0.5).fit(worths) == 3


def test_sized_by_the_cost_model_from_the_first_step(tiny_llama64):
    """A cost model where every verified token costs a plain step gets plain steps only (none verifies the
    window, the first included); one where verifying is free gets the whole method; `k` the whole method."""
    steep = CostModel((1, 2, 4, 8, 16, 32, 64), (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0))
    params = SamplingParams(max_new_tokens=12)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6, 3, 1, 4]
    for cost, spec, least in [  # least: nodes the first step verifies at least (level 0's chain: W - 1 = 4)
        (steep, "lookahead", 0),
        (CostModel.flat(), "lookahead", 4),
        (steep, "lookahead:k=64", 4),
    ]:
        make_plan = plan_of(make(spec), cost)
        steps = list(generate(tiny_llama64, prompt, params, make_plan))[1:]
        drafted = [s.drafted for s in steps]
        assert (max(drafted) == 0) if not least else drafted[0] >= least, (spec, drafted)


def test_a_cut_proposal_advances_only_the_columns_it_holds():
    s = session([3, 3], window=4, ngram=3, guess=1, prompt=0)
    s.levels = [[0, 11, 12, 13], [20, 21, 22, 23]]
    prop = s.propose(DraftContext([3, 3, 1], budget=64))  # columns: 20; 11, 21; 12, 22; 13, 23
    cut = prop.prefix(4)  # 20 (column 0's top), 11, 21 (column 1's top), 12; not 22 (column 2's top)
    s.observe(cut, rows(cut, [0, 40, 0, 41, 0]))
    assert s.levels == [[20, 21, 12, 13], [40, 41, 22, 23]]
    assert pool(s) == {1: [(20, 40)], 11: [(21, 41)]}


def test_a_step_sized_to_nothing_changes_nothing():
    s = session([3, 4], window=3, ngram=3, prompt=0)
    before = [list(lv) for lv in s.levels]
    prop = s.propose(DraftContext([3, 4, 5], budget=8))
    s.observe(prop.prefix(0), Verdict([6], [], []))
    assert s.levels == before and pool(s) == {}


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("lookahead:window=0", "window (columns"),
        ("lookahead:ngram=1", "ngram (n-gram size"),
        ("lookahead:guess=0", "guess (n-grams"),
        ("lookahead:prompt=2", "prompt (pool"),
        ("lookahead:window=16,ngram=8", "must fit one verify pass"),
        ("lookahead:window=2.5", "must be an integer"),
        ("lookahead:size=3", "unknown option"),
    ],
)
def test_bad_options_are_one_line(spec, needle):
    with pytest.raises(SkipjackError, match=needle.replace("(", r"\(")) as e:
        MethodSpec.parse(spec)
    assert "\n" not in str(e.value)


def test_it_is_lossless_and_registered():
    spec = MethodSpec.parse("lookahead:window=3,ngram=4,guess=2,k=8")
    assert spec.lossless and spec.drafts and spec.k == 8
    assert spec.options == {"window": 3, "ngram": 4, "guess": 2}


OPTIONS = st.fixed_dictionaries(
    {
        "window": st.integers(1, 6),
        "ngram": st.integers(2, 5),
        "guess": st.integers(1, 4),
        "prompt": st.integers(0, 1),
        "k": st.sampled_from([0, 0, 3, 12]),
    }
)
prompts = st.lists(st.integers(0, 47), min_size=1, max_size=16).flatmap(
    lambda base: st.integers(1, 3).map(lambda r: (base * r)[:32])
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=prompts,
    max_new=st.integers(1, 40),
    stop_at=st.one_of(st.none(), st.integers(0, 39)),
    opts=OPTIONS,
    family=st.sampled_from(["llama", "gemma", "llama-q4"]),
    penalty=st.sampled_from([1.0, 1.0, 1.3]),
)
def test_greedy_identity_property(
    tiny_llama64, tiny_gemma64, tiny_llama_q4, prompt, max_new, stop_at, opts, family, penalty
):
    """Any window, n-gram size, guess set and budget: plain greedy's tokens, stops inside a step included (the
    defaults run in `test_speculative.py`'s property test with the other drafters, on every family)."""
    model = {"llama": tiny_llama64, "gemma": tiny_gemma64, "llama-q4": tiny_llama_q4}[family]
    stops: set[int] = set()
    if stop_at is not None:
        free, _ = decode(model, prompt, SamplingParams(max_new_tokens=max_new, repetition_penalty=penalty))
        stops = {free[stop_at % len(free)]}
    params = SamplingParams(max_new_tokens=max_new, stop_token_ids=frozenset(stops), repetition_penalty=penalty)
    spec = "lookahead:" + ",".join(f"{k}={v}" for k, v in opts.items())
    plain, _ = decode(model, prompt, params)
    out, steps = decode(model, prompt, params, spec)
    assert out == plain
    assert all(s.drafted <= (opts["k"] or 64) for s in steps)


def test_greedy_identity_accepts_from_the_pool(tiny_llama64):
    """On a repetitive output both branches get accepted: n-grams from the window and the window's own nodes."""
    params = SamplingParams(max_new_tokens=60)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    plain, _ = decode(tiny_llama64, prompt, params)
    out, steps = decode(tiny_llama64, prompt, params, "lookahead:window=4,ngram=3,guess=4,prompt=0")
    assert out == plain and sum(s.accepted for s in steps) > 5


def test_sampling_keeps_the_models_law():
    """χ² on the 2nd and 3rd sampled tokens: the drafts are deterministic, the one verifier samples."""
    from conftest import hf_model, ours_from_hf

    torch.set_num_threads(1)  # tiny tensors (the conftest fixture gives the threads back)
    model = ours_from_hf(hf_model("llama", seed=21, vocab=12, hidden_size=32, intermediate_size=64), torch.float64)
    assert chi2_pvalue(model, [5, 0, 7, 2, 9, 4, 11, 1], "lookahead:window=3,ngram=3,guess=3", n=1200) > 1e-3
