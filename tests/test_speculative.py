"""Lossless speculation: every drafter reproduces plain greedy exactly; sampling preserves the distribution."""

from __future__ import annotations

import pytest
import torch
from drafters_mock import AlwaysAccept, NeverAccept, RandomDrafter, decode, drafter_or_spec, greedy_continuation
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skipjack.decoding.cost import CostModel
from skipjack.decoding.proposal import Proposal
from skipjack.decoding.sampling import SamplingParams
from skipjack.decoding.session import Session
from skipjack.errors import SkipjackError


def run(model, prompt, params, drafter="plain", cost=None):
    return decode(model, prompt, params, drafter, cost)


prompts = st.lists(st.integers(0, 47), min_size=1, max_size=24).flatmap(
    lambda base: st.integers(1, 3).map(lambda r: (base * r)[:40])  # repeats give prompt lookup something to find
)
DRAFTERS = [
    "pld",
    "ngram",
    "pld:k=3",
    "ngram:k=5,width=2",
    "lookahead",
    "lookahead:k=6",
    "always",
    "never",
    "random",
    "random-tree",
]


make = drafter_or_spec


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=prompts,
    max_new=st.integers(1, 40),
    stops=st.sets(st.integers(0, 47), max_size=3),
    stop_at=st.one_of(st.none(), st.integers(0, 39)),
    drafter=st.sampled_from(DRAFTERS),
    family=st.sampled_from(["llama", "gemma", "llama-q4", "gemma-q4"]),
    seed=st.integers(0, 10_000),
    penalty=st.sampled_from([1.0, 1.0, 1.3]),
)
def test_greedy_identity_property(
    tiny_llama64,
    tiny_gemma64,
    tiny_llama_q4,
    tiny_gemma_q4,
    prompt,
    max_new,
    stops,
    stop_at,
    drafter,
    family,
    seed,
    penalty,
):
    """`stop_at` also makes a token of plain's own output a stop token, so that about half the cases stop
    inside the output (often inside a verify step's accepted tokens) rather than rarely, by chance. The q4
    models are fp32 with 4-bit weights: identity there rests on the batch-invariant forward, not on fp64."""
    models = {"llama": tiny_llama64, "gemma": tiny_gemma64, "llama-q4": tiny_llama_q4, "gemma-q4": tiny_gemma_q4}
    model = models[family]
    if stop_at is not None:
        free, _ = run(model, prompt, SamplingParams(max_new_tokens=max_new, repetition_penalty=penalty))
        stops = stops | {free[stop_at % len(free)]}
    params = SamplingParams(max_new_tokens=max_new, stop_token_ids=frozenset(stops), repetition_penalty=penalty)
    plain, _ = run(model, prompt, params)
    spec, steps = run(model, prompt, params, make(drafter, model, seed))
    assert spec == plain
    assert steps[-1].finish in ("stop", "length")


@pytest.mark.parametrize("drafter", ["random-tree", "pld", "ngram"])
def test_greedy_identity_over_evicting_sliding_caches(sliding_gemma64, drafter):
    """Gemma 3's local layers on sliding caches that have evicted (a 320-token prompt, window 6): tree and
    chain drafts verified, rolled back and compacted there still give plain greedy's tokens."""
    from skipjack.cache import SlidingLayerKV

    model = sliding_gemma64
    g = torch.Generator().manual_seed(0)
    prompt = (torch.randint(0, 48, (30,), generator=g).tolist() * 11)[:320]
    assert any(isinstance(layer, SlidingLayerKV) for layer in model.make_cache(len(prompt) + 40 + 65))
    accepted = 0
    for seed, penalty in [(0, 1.0), (1, 1.3)]:
        params = SamplingParams(max_new_tokens=40, repetition_penalty=penalty)
        plain, _ = run(model, prompt, params)
        spec, steps = run(model, prompt, params, make(drafter, model, seed))
        assert spec == plain
        accepted += sum(s.accepted for s in steps)
    assert accepted > 0


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_always_accept_accepts_everything(tiny_llama64, tiny_gemma64, family):
    model = tiny_llama64 if family == "llama" else tiny_gemma64
    params = SamplingParams(max_new_tokens=30)
    plain, _ = run(model, [1, 2, 3], params)
    d = AlwaysAccept(model, k=5)
    spec, steps = run(model, [1, 2, 3], params, d)
    assert spec == plain
    assert d.proposed > 0 and d.accepted == d.proposed
    assert all(s.accepted == s.drafted for s in steps)
    assert len(steps) <= 1 + -(-29 // 6)  # 6 tokens per verify step


class RowRecorder(RandomDrafter):
    """Random trees that keep each verified proposal with the context it was drafted after."""

    def begin(self, prompt):
        super().begin(prompt)
        self.seen = []

    def propose(self, ctx):
        prop = super().propose(ctx)
        if prop is not None:
            prop.state = list(ctx.tokens)  # handed back in observe: the context it was drafted after
        return prop

    def observe(self, proposal, verdict):
        super().observe(proposal, verdict)
        self.seen.append((proposal.state, proposal, verdict))


def test_verify_rows_report_the_targets_argmax_after_every_node(tiny_llama64):
    d = RowRecorder(tiny_llama64, seed=3, tree=True)
    run(tiny_llama64, [4, 5, 6, 7], SamplingParams(max_new_tokens=48), d)
    rejected = 0
    for ctx, prop, verdict in d.seen:
        assert len(verdict.argmax) == len(prop) + 1
        paths = []
        for t, p in zip(prop.tokens, prop.parents):
            paths.append((paths[p] if p >= 0 else []) + [t])
        assert verdict.argmax[0] == greedy_continuation(tiny_llama64, ctx, 1)[0]
        for i, path in enumerate(paths):  # a fresh forward after the node's own path, accepted or not
            assert verdict.argmax[i + 1] == greedy_continuation(tiny_llama64, ctx + path, 1)[0]
            rejected += i not in verdict.path
    assert len(d.seen) > 3 and rejected > 10


def test_never_accept_degrades_to_plain(tiny_llama64):
    params = SamplingParams(max_new_tokens=25)
    plain, _ = run(tiny_llama64, [4, 5, 6], params)
    d = NeverAccept(tiny_llama64)
    spec, steps = run(tiny_llama64, [4, 5, 6], params, d)
    assert spec == plain
    assert d.proposed > 0 and d.accepted == 0
    assert all(len(s.tokens) == 1 for s in steps)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_prefilled_prompt_is_reused_unchanged(tiny_llama64, tiny_gemma64, family):
    """Requests started from one prefilled session (copy-from) decode exactly as requests that run the prompt
    themselves (greedy: any method; seeded sampling: the same method), and leave the prefilled cache as it
    was, for reuse."""
    model = tiny_llama64 if family == "llama" else tiny_gemma64
    prompt = [5, 6, 7, 8, 5, 6, 7, 9, 5, 6] * 3
    pre = Session.prefilled(model, prompt, 24)
    snapshot = [(layer.offset, layer.k.clone(), layer.v.clone()) for layer in pre.cache]
    greedy, sampled = SamplingParams(max_new_tokens=24), SamplingParams(max_new_tokens=24, temperature=0.9, seed=4)
    plain, _ = run(model, prompt, greedy)
    for params, method in [(greedy, m) for m in ("plain", "pld", "ngram", "pld:k=3")] + [
        (sampled, "plain"),
        (sampled, "pld"),
    ]:
        fresh, _ = run(model, prompt, params, method)
        out, steps = decode(model, prompt, params, method, session=pre)
        assert out == fresh, method
        assert params is sampled or fresh == plain
        assert steps[0].forward_tokens == 0  # the prompt did not run again
    for layer, (offset, k, v) in zip(pre.cache, snapshot):
        assert layer.offset == offset and torch.equal(layer.k, k) and torch.equal(layer.v, v)
    with pytest.raises(SkipjackError, match="not this request's prompt"):
        decode(model, prompt[:-1], SamplingParams(max_new_tokens=4), session=pre)
    with pytest.raises(SkipjackError, match="this request needs"):
        decode(model, prompt, SamplingParams(max_new_tokens=200), session=pre)


def test_cost_model_sizes_drafts():
    flat = CostModel.flat()
    assert flat.best_size([0.9, 0.8, 0.1]) == 3  # free verification: take every positive-score node
    steep = CostModel((1, 2, 4, 8), (1.0, 2.0, 4.0, 8.0))  # verification linear in width: never worth it
    assert steep.best_size([0.9, 0.8, 0.7]) == 0
    mid = CostModel((1, 2, 4, 8), (1.0, 1.1, 1.3, 2.5))
    assert mid.best_size([0.9, 0.8, 0.7, 0.05, 0.01]) == 3
    assert mid.cost(3) == pytest.approx(1.2)
    # Below the prior's context a wide forward's steeper growth can make c(n) dip (here c(3) < c(2) at
    # context 0): a useless node must not look worth verifying because its width happens to cost less.
    dip = CostModel((1, 2, 4), (1.0, 1.3, 1.35), slope=(0.0, 0.0, 0.001))
    assert dip.cost(3, 0) < dip.cost(2, 0)
    assert dip.best_size([0.9, 0.0], 0) == 1


def test_cost_model_calibrates_online_from_observed_step_times():
    prior = CostModel((1, 2, 4, 8), (1.0, 1.0, 1.0, 1.5), learn=True)  # a flat start, then rising
    assert prior.best_size([0.1, 0.05]) == 2  # the prior says two more nodes are free
    for _ in range(60):  # ...but the loop sees every verify step pay 20% over a plain step
        prior.observe(1, 0.010)
        prior.observe(2, 0.012)
        prior.observe(4, 0.012)
    assert prior.cost(2) == pytest.approx(1.2, rel=0.03) and prior.cost(4) == pytest.approx(1.2, rel=0.03)
    assert prior.cost(8) == pytest.approx(1.7, rel=0.03)  # the prior's shape, shifted by the learned overhead
    assert prior.best_size([0.1, 0.05]) == 0  # 0.15 expected tokens do not pay a 20% dearer step
    assert all(prior.cost(n) <= prior.cost(n + 1) for n in range(1, 64))
    noisy = CostModel((1, 2, 3, 4), (1.0, 1.3, 0.9, 1.0))  # a noisy spike at width 2 is averaged, not ratcheted
    assert noisy.cost(2) == pytest.approx(16 / 15) and noisy.cost(4) == pytest.approx(16 / 15)
    fixed = CostModel((1, 8), (1.0, 1.0))  # learn=False: observations are ignored
    for _ in range(40):
        fixed.observe(8, 1.0)
        fixed.observe(1, 0.01)
    assert fixed.cost(8) == 1.0


def test_cost_model_learns_per_context_bucket():
    """Verify cost grows with the context (attention over the cache): a long context learns its own curve,
    the short one keeps its own, and a long bucket first takes plain steps to measure t1 there."""
    cm = CostModel((1, 2, 4, 8), (1.0, 1.0, 1.0, 1.1), learn=True, beta=1e-4)
    scores = [0.9, 0.8, 0.1, 0.1, 0.05, 0.05, 0.05]
    assert cm.best_size(scores, 100) >= 3  # the prior: verifying up to 4 tokens costs as much as 1
    assert cm.best_size(scores, 4000) == 0  # a new long bucket: plain steps until t1 is measured there
    for _ in range(60):
        cm.observe(1, 0.010, 100)
        cm.observe(4, 0.010, 100)
        cm.observe(8, 0.011, 100)
        cm.observe(1, 0.020, 4000)  # plain steps at 4000 cost 2x (the line 1 + beta * L says 1.4x)
        cm.observe(4, 0.030, 4000)
        cm.observe(8, 0.040, 4000)
    assert cm.t1(4000) == pytest.approx(0.020, rel=0.1)
    assert cm.cost(4, 100) == pytest.approx(1.0, abs=0.05) and cm.cost(8, 100) == pytest.approx(1.1, abs=0.05)
    assert cm.cost(4, 4000) == pytest.approx(1.5, rel=0.05) and cm.cost(8, 4000) == pytest.approx(2.0, rel=0.05)
    assert cm.best_size(scores, 100) >= 3
    # c(2), c(3) unobserved at 4000: interpolated between c(1) = 1 and the observed c(4) = 1.5, not flat
    assert cm.cost(2, 4000) == pytest.approx(7 / 6, rel=0.05) and cm.cost(3, 4000) == pytest.approx(4 / 3, rel=0.05)
    assert cm.best_size(scores, 4000) == 2  # 2.7 / c(3) = 2.0 beats 2.8 / c(4) = 1.87 and 1.9 / c(2) = 1.6
    assert cm.cost(8, 2000) >= cm.cost(8, 100)  # an unobserved bucket in between: at least the shorter one's
    assert cm.cost(32, 4000) > 2 * cm.cost(32, 100)  # wide drafts extrapolate from the long curve
    # What the bench reports: the buckets that saw steps (2049-4096 here), with their learned curves.
    curves = {tuple(c["context"]): c for c in cm.curves(widths=(4, 8))}
    assert set(curves) == {(0, 512), (2049, 4096)}
    long = curves[(2049, 4096)]
    assert long["plain_steps"] == 60 and long["verify_steps"] == 118  # the first round came before 3 plain steps
    assert long["cost"] == {"4": pytest.approx(1.5, rel=0.05), "8": pytest.approx(2.0, rel=0.05)}
    assert long["typical_context"] == 3072 and long["t1_seconds"] == pytest.approx(cm.t1(3072))


def test_cost_prior_is_a_line_in_the_context():
    """The prior measured at two contexts gives the cost at every context; what bucket 0 learns on top of its
    prior carries over to the longer buckets."""
    cm = CostModel((1, 4, 8), (1.0, 1.0, 1.1), learn=True, slope=(1e-4, 2e-4, 4e-4))
    assert cm.cost(8, 256) == pytest.approx(1.1)
    for L in (1000, 3000, 6000):
        d = L - 256
        assert cm.cost(8, L) == pytest.approx((1.1 + 4e-4 * d) / (1 + 1e-4 * d))
        assert cm.cost(4, L) == pytest.approx((1.0 + 2e-4 * d) / (1 + 1e-4 * d))
    assert cm.cost(8, 4100) < cm.cost(8, 8000)  # within one bucket, too
    before = cm.cost(8, 3000)
    for _ in range(100):
        cm.observe(1, 0.010, 256)
        cm.observe(8, 0.014, 256)  # bucket 0 learns c(8) = 1.4, not the measured 1.1
    assert cm.cost(8, 256) == pytest.approx(1.4, abs=0.02)
    assert cm.cost(8, 3000) == pytest.approx(before + cm.cost(8, 256) - 1.1, abs=0.01)
    flat = CostModel((1, 4, 8), (1.0, 1.0, 1.1))  # no slope: one curve for every context
    assert flat.cost(8, 3000) == pytest.approx(1.1)


def test_cost_prior_is_cached_on_disk(tiny_llama64, tmp_path, monkeypatch):
    """The measured prior is written atomically, read back by the next process instead of measuring again,
    and a corrupt or malformed file is measured again and rewritten."""
    import json

    from skipjack.decoding import tuning

    monkeypatch.setenv("SKIPJACK_HOME", str(tmp_path))
    calls = []
    measure = CostModel.measure.__func__
    monkeypatch.setattr(CostModel, "measure", classmethod(lambda cls, m: calls.append(1) or measure(cls, m)))
    cm = tuning.cost_prior(tiny_llama64, {}, remeasure=True)
    path = tuning.prior_path(tiny_llama64, {})
    assert path.parent == tmp_path / "costs" and json.loads(path.read_text()) == cm.prior_json()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    again = tuning.cost_prior(tiny_llama64, {})  # as in a new process
    assert len(calls) == 1 and again.learn and (again.widths, again.rel, again.slope) == (cm.widths, cm.rel, cm.slope)
    assert again is not cm  # each engine gets a cost model of its own, which then learns
    for bad in ("{not json", '{"widths": [2, 1], "rel": [1, 1], "slope": [0, 0], "beta": 0}', "[]"):
        path.write_text(bad)
        tuning.cost_prior(tiny_llama64, {})
        assert CostModel.from_prior_json(json.loads(path.read_text())) is not None
    assert len(calls) == 4


class ForeignDrafter(AlwaysAccept):
    """Right for two tokens, then either a token id from another vocabulary or a parent that does not come
    first (each followed by an otherwise valid node)."""

    def __init__(self, model, flaw):
        super().__init__(model)
        self.flaw = flaw

    def propose(self, ctx):
        right = greedy_continuation(self.model, ctx.tokens, 2)
        if self.flaw == "token":
            return Proposal(right + [10_000, 1], [-1, 0, 1, 2], [0.9] * 4)
        return Proposal(right + [1, 2], [-1, 0, 7, 2], [0.9] * 4)


@pytest.mark.parametrize("flaw", ["token", "parent"])
def test_out_of_vocab_drafts_are_pruned_not_fatal(tiny_llama64, flaw):
    """Any drafter proposing ids >= vocab or a parent that does not come first must not crash the forward
    pass: the valid prefix is verified, the rest dropped."""
    params = SamplingParams(max_new_tokens=20)
    plain, _ = run(tiny_llama64, [1, 2, 3], params)
    spec, steps = run(tiny_llama64, [1, 2, 3], params, ForeignDrafter(tiny_llama64, flaw))
    assert spec == plain
    assert max(s.drafted for s in steps) == 2  # the two valid nodes were verified, the rest dropped


def test_foreign_ngram_table_is_pruned_not_fatal(tiny_llama64):
    """A shared n-gram table filled by a larger-vocabulary model (the CI failure of session 1)."""
    params = SamplingParams(max_new_tokens=20)
    from drafters_mock import make as make_method

    ng = make_method("ngram:table=foreign").drafter
    for t in range(48):  # every token of the 48-token vocab is followed by ids far outside it
        ng.table.add([t, 500 + t, 600 + t], 0, 5.0)
    proposed, session = [], ng.session

    def spied():
        s = session()
        propose = s.propose
        s.propose = lambda ctx: proposed.append(p := propose(ctx)) or p
        return s

    ng.session = spied
    spec, _ = run(tiny_llama64, [0, 5, 0], params, ng)
    assert spec == run(tiny_llama64, [0, 5, 0], params)[0]
    assert any(p is not None and max(p.tokens) >= 48 for p in proposed)  # foreign ids really were drafted
