"""Swift and DEL drafters: skip-set search at load, its cache file, DEL's layer choice, reduced draft heads,
forks of learned state, and a mix's capabilities from its parts."""

from __future__ import annotations

import pytest
import torch
from drafters_mock import decode
from test_selfspec import _ctx, _prepared, build_models

from skipjack import store
from skipjack.decoding.cost import CostModel
from skipjack.decoding.sampling import SamplingParams
from skipjack.drafters.base import Resources
from skipjack.drafters.draft_model import DraftModel
from skipjack.drafters.early_exit import EarlyExit
from skipjack.drafters.layered import DraftHead
from skipjack.drafters.mix import Mix, part_names
from skipjack.drafters.pld import PromptLookup
from skipjack.drafters.swift import Swift, parse_skip, value
from skipjack.errors import SkipjackError
from skipjack.weights.linear import rows


@pytest.fixture(scope="module")
def models():
    return build_models()


def test_swift_search_is_deterministic_and_prefers_the_better_set(models, monkeypatch):
    model = models["llama"]
    text = list(range(3, 40))
    a, b = Swift(save=False, search=12), Swift(save=False, search=12)
    with monkeypatch.context() as m:  # the same measured costs for both (timings vary from run to run)
        m.setattr(Swift, "timing", lambda self, ctx: setattr(self, "times", (1.0, 0.1, 0.1)))
        _prepared(a, model, text), _prepared(b, model, text)
    assert a.skip == b.skip and a.evals == b.evals == 12  # searched in prepare; deterministic under a seed
    good = frozenset({("attn", 1), ("ffn", 2), ("ffn", 3)})
    s = Swift(save=False, search=40, patience=40)
    s._setup(model)
    s.times = (1.0, 0.1, 0.1)
    rest = [c for c in s.candidates if c not in good]
    monkeypatch.setattr(s, "reference", lambda ctx: ([], sorted(good) + rest))
    monkeypatch.setattr(s, "score", lambda ctx, skip, truth: 0.95 if skip == good else 0.9 - 0.3 * len(skip - good))
    s.optimise(_ctx(model, text), 40, scan=True)
    assert s.skip == good and s.pays()  # the best-scoring set, over its subsets (cheaper) and supersets


def test_swift_searches_in_prepare_never_in_a_request(models, tmp_path, monkeypatch):
    """The skip set is searched (and the passes timed, the set saved) once, in `prepare`, on local text; a
    request drafts with it and never times, searches or writes. Without local text nothing is searched."""
    monkeypatch.setenv("SKIPJACK_HOME", str(tmp_path))
    model = models["llama"]
    s = Swift(search=6, threshold=0.0)
    s.prepare(Resources(model=model, text=lambda: list(range(3, 40))))
    assert s.evals == 6 and s.times is not None and s.path.exists()
    found = (s.skip, s.match, s.evals, s.times, s.path.read_text())

    def never(*a, **kw):
        raise AssertionError("a request searched, timed or wrote a file")

    for name in ("timing", "optimise", "reference", "score", "_store", "_load"):
        monkeypatch.setattr(s, name, never)
    monkeypatch.setattr(store, "write_atomic", never)
    params = SamplingParams(max_new_tokens=12)
    for prompt in ([5, 6, 7, 8, 5, 6], [9, 1, 2]):
        got, steps = decode(model, prompt, params, s)
        assert got == decode(model, prompt, params)[0]
        assert any(step.drafted for step in steps) == s.drafting
    assert (s.skip, s.match, s.evals, s.times, s.path.read_text()) == found
    monkeypatch.undo()
    monkeypatch.setenv("SKIPJACK_HOME", str(tmp_path / "none"))
    blind = Swift()
    blind.prepare(Resources(model=model))  # no local text: nothing searched, timed or saved
    assert blind.evals == 0 and blind.times is None and blind.skip == frozenset() and not blind.drafting
    assert blind.session().propose(_ctx(model, [1, 2, 3])) is None and not blind.path.exists()
    given = Swift(skip="a1+f2")
    given.prepare(Resources(model=model, text=lambda: list(range(3, 40))))  # the user's set: no search
    assert given.evals == 0 and given.times is None and given.skip == parse_skip("a1+f2") and given.drafting


def test_swift_value_grows_with_match_and_falls_with_cost():
    assert value(0.9, 0.5) > value(0.7, 0.5) > value(0.7, 0.9)
    assert value(1.0, 1.0) == pytest.approx(1.0)  # drafting with the whole model never pays
    assert value(0.0, 0.3) == 1.0


def test_swift_saves_and_reuses_its_set(models, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPJACK_HOME", str(tmp_path))
    model = models["llama"]
    text = list(range(3, 40))
    first = Swift(search=6)
    _prepared(first, model, text)
    again = Swift(search=6, refine=0)
    _prepared(again, model, text)
    assert again.skip == first.skip and again.evals == 0  # loaded, not searched
    refined = Swift(search=6, refine=3)
    _prepared(refined, model, text)
    assert refined.evals == 3  # loaded, then refined on the local text (in prepare)
    unread = Swift(search=6)
    _prepared(unread, model)  # no local text: the saved set as it is
    assert unread.skip == refined.skip and unread.evals == 0


def test_del_picks_the_layer_with_higher_shadow_acceptance(models):
    d = EarlyExit()
    d.prepare(Resources(model=models["llama"]))
    d.seen = [100, 100, 100, 100]
    d.hits = [10, 95, 20, 30]
    assert d.choose(8, resume=True)[0] == 1
    d.hits = [10, 20, 97, 30]
    assert d.choose(8, resume=True)[0] == 2
    d.hits = [1, 1, 1, 1]
    d.choose(8, resume=True)
    assert d.worth <= 1.0  # nothing pays: `del` then drafts only its probes


def test_del_learns_shadow_tokens_from_verified_rows(models):
    model = models["llama-q4"]
    d = EarlyExit(probe_every=1)
    prompt = [4, 8, 15, 16, 23, 42, 4, 8]
    decode(model, prompt, SamplingParams(max_new_tokens=30), _prepared(d, model), CostModel.flat())
    assert sum(d.seen) > 0 and all(0 <= h <= s for h, s in zip(d.hits, d.seen))  # learned by the drafter
    again = EarlyExit(probe_every=1)
    decode(model, prompt, SamplingParams(max_new_tokens=30), _prepared(again, model), CostModel.flat())
    assert again.hits == d.hits and again.seen == d.seen  # deterministic


def test_reduced_vocabulary_head_rows_are_bitwise_the_full_heads(models):
    for family in ("llama", "llama-q4"):
        m = models[family]
        h = torch.randn(3, m.config.hidden_size, dtype=m.dtype)
        ids = torch.tensor([0, 5, 7, 30])
        assert torch.equal(rows(m.lm_head, ids)(h), m.lm_head(h)[:, ids])
    head = DraftHead(models["llama"], vocab=4, counts={7: 9, 3: 5, 11: 2, 40: 1})
    assert sorted(head.ids.tolist()) == [3, 7, 11, 40]
    toks, _ = head.top(torch.randn(2, models["llama"].config.hidden_size, dtype=torch.float64))
    assert all(t[0] in (3, 7, 11, 40) for t in toks)


def test_fork_keeps_learned_state_and_shares_the_models(models):
    """The bench snapshots drafters between repeats (`Drafter.fork`): the fork shares the models, heads and
    skip set, and has a copy of what was learned (`LEARNED`) that the original no longer sees change."""
    model = models["llama-q4"]
    d = EarlyExit(probe_every=1)
    decode(model, [1, 2, 3, 4, 1, 2], SamplingParams(max_new_tokens=12), _prepared(d, model), CostModel.flat())
    c = d.fork()
    assert c.model is d.model and c.head is d.head and c.seen == d.seen and c.seen is not d.seen
    assert c.calib is not d.calib and c.calib.pred == d.calib.pred
    before = list(d.seen)
    decode(model, [4, 3, 2, 1], SamplingParams(max_new_tokens=12), c, CostModel.flat())
    assert d.seen == before and c.seen != before  # a fork's session learns into the fork only
    s = Swift(skip="a1+f2", threshold=0.0, save=False)
    decode(model, [1, 2, 3, 4, 1, 2], SamplingParams(max_new_tokens=12), _prepared(s, model), CostModel.flat())
    f = s.fork()
    assert f.model is s.model and f.head is s.head and f.skip == s.skip and f.calib is not s.calib
    assert (f.calib.pred, f.calib.got) == (s.calib.pred, s.calib.got) and s.calib.pred > 0
    m = DraftModel(models["draft"], threshold=0.0)
    assert m.fork().model is m.model


def test_mix_takes_its_capabilities_from_its_parts():
    """The registry builds the parts (handing `model` to those that take one); the mix is lossless only if
    every part is, reads past keys if any part does, costs what its parts cost together and forks them."""
    from skipjack.drafters.base import Drafter

    class Layered(Drafter):
        name, lossless, reads_past_keys = "layered", False, True
        cost_prior = 0.25

        def describe(self):
            return {"exit": 2}

    m = Mix("pld+layered", parts=[PromptLookup(), Layered()])
    assert not m.lossless and m.reads_past_keys and not m.owns_cache and m.cost_prior == 0.25
    assert m.describe() == {"layered": {"exit": 2}}  # pld has nothing to say
    both = Mix("pld+pld", parts=[PromptLookup(), PromptLookup()])
    assert both.lossless and not both.reads_past_keys and both.cost_prior == 0.0  # pld drafts for free
    both.parts[0].pooled[0][1] = 5
    fork = both.fork()
    assert fork.parts[0] is not both.parts[0] and fork.parts[0].pooled == both.parts[0].pooled
    fork.parts[0].pooled[0][1] += 1
    assert both.parts[0].pooled[0][1] == 5  # what the fork learns stays its own
    assert part_names("pld + swift", ["pld", "swift", "mix"]) == ["pld", "swift"]
    for bad in ("pld", "pld+nothing", "pld+mix"):
        with pytest.raises(SkipjackError, match="of= needs two or more of pld, swift joined by"):
            part_names(bad, ["pld", "swift", "mix"])
