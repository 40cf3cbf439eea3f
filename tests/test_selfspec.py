"""Drafting with the model's own layers (`swift`, `del`), with a smaller model (`draft`), merged trees (`mix`):
lossless (greedy identity, the distribution under sampling, the cache after rollback), deterministic
searches and estimates that prefer what scores better, draft cost in the sizer, and one-line errors."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_model, ours_from_hf
from drafters_mock import chi2_pvalue, decode, make
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skipjack.decoding.cost import CostModel
from skipjack.decoding.proposal import DraftContext, Proposal, Verdict
from skipjack.decoding.sampling import SamplingParams
from skipjack.decoding.session import Session
from skipjack.decoding.sizing import CostSizer, DraftCost
from skipjack.drafters.base import Drafter, DraftSession, Resources
from skipjack.drafters.draft_model import DraftModel, check_tokenizers
from skipjack.drafters.early_exit import EarlyExit
from skipjack.drafters.layered import DraftHead
from skipjack.drafters.mix import Mix
from skipjack.drafters.swift import Swift, parse_skip
from skipjack.errors import SkipjackError


def deep(family: str, weights=None, dtype=torch.float32, seed=3, layers=5, vocab=48):
    kind = "gemma3_text" if family == "gemma" else "llama"
    hf = hf_model(kind, seed=seed, vocab=vocab, num_hidden_layers=layers)
    return ours_from_hf(hf, dtype if weights is None else torch.float32, weights)


def build_models() -> dict:
    """5-layer tiny models: fp64 (exact by precision) and q4 (exact by the batch-invariant forward)."""
    out = {f: deep(f, dtype=torch.float64) for f in ("llama", "gemma")}
    out |= {f + "-q4": deep(f, weights="q4") for f in ("llama", "gemma")}
    out["draft"] = deep("llama", dtype=torch.float64, seed=9, layers=2)  # a sibling for `draft`
    out["draft-q4"] = deep("llama", weights="q4", seed=9, layers=2)
    return out


@pytest.fixture(scope="module")
def models():
    return build_models()


def drafter(name: str, models: dict, family: str):
    """Self-drafts forced to draft on random weights (fixed sets, threshold 0), and a small draft model, each
    prepared for the family's model."""
    q4, model = family.endswith("q4"), models[family]
    if name == "draft":
        return _prepared(DraftModel(models["draft-q4" if q4 else "draft"], threshold=0.0), model)
    if name == "mix":
        from skipjack.drafters.pld import PromptLookup

        parts = [PromptLookup(), Swift(skip="a1+f3", threshold=0.0, save=False)]
        return _prepared(Mix("pld+swift", parts=parts), model)
    return make(name, model).drafter


METHODS = [
    "swift:skip=a1+f2,threshold=0,save=0",
    "swift:skip=f1+a2+a3,threshold=0.6,width=3,save=0",
    "swift:skip=a2,threshold=0,vocab=16,save=0",
    "del:exit=1,threshold=0",
    "del:exit=2,threshold=0,probe_every=1",
    "del:exit=3,threshold=0,vocab=20,probe_every=2",
    "del:probe_every=1",
    "draft",
    "mix",
]


@settings(max_examples=160, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=st.lists(st.integers(0, 47), min_size=1, max_size=20),
    max_new=st.integers(1, 30),
    method=st.sampled_from(METHODS),
    family=st.sampled_from(["llama", "gemma", "llama-q4", "gemma-q4"]),
    k=st.sampled_from([0, 2, 5]),
)
def test_greedy_identity_property(models, prompt, max_new, method, family, k):
    """Every method gives plain greedy decoding's exact tokens (fixed sizes and the cost model's)."""
    model = models[family]
    params = SamplingParams(max_new_tokens=max_new)
    plain, _ = decode(model, prompt, params)
    d = drafter(method, models, family)
    cost = None if k else CostModel.flat()
    got, steps = decode(model, prompt, params, d if not k else _fixed(d, k), cost)
    assert got == plain
    if method.startswith(("swift", "del:exit", "draft")) and max_new > 3:
        assert any(s.drafted for s in steps)  # the forced drafts really ran


def _fixed(d, k):
    """A drafter whose sessions are `d`'s with the budget capped at k (a fixed draft size)."""

    class Capped(Drafter):
        lossless, name = True, d.name

        def session(self):
            return CappedSession(d.session())

    class CappedSession(DraftSession):
        def __init__(self, inner):
            self.inner = inner

        def begin(self, prompt):
            self.inner.begin(prompt)

        def end(self):
            self.inner.end()

        def propose(self, ctx):
            return self.inner.propose(DraftContext(ctx.tokens, min(ctx.budget, k), ctx.model, ctx.cache, ctx.more))

        def observe(self, p, v):
            self.inner.observe(p, v)

    return Capped()


def _session_cache(model, prompt, params, d):
    s = Session()
    decode(model, prompt, params, "plain" if d is None else d, CostModel.flat(), session=s)
    return s


@pytest.mark.parametrize("family", ["llama-q4", "gemma-q4"])
@pytest.mark.parametrize("method", ["del:exit=2,threshold=0", "swift:skip=a1+f2+a3,threshold=0,save=0", "draft"])
def test_cache_after_drafting_equals_plain_decodings(models, family, method):
    """After a request, the cache (every layer: the ones a draft skipped or exited before too) holds exactly
    the keys plain decoding leaves, bit for bit on the batch-invariant q4 models; and `del` resumed its
    verify passes from the draft's hidden states (its lower layers' keys were kept, not recomputed)."""
    model = models[family]
    prompt, params = [3, 1, 4, 1, 5, 9, 2, 6], SamplingParams(max_new_tokens=24)
    ref = _session_cache(model, prompt, params, None)
    d = drafter(method, models, family)
    got = _session_cache(model, prompt, params, d)
    assert got.tokens == ref.tokens
    for a, b in zip(got.cache, ref.cache):
        n = b.offset
        assert a.offset == n
        assert torch.equal(a.k[:, :, :n], b.k[:, :, :n]) and torch.equal(a.v[:, :, :n], b.v[:, :, :n])


def test_del_resumes_verification_only_where_the_forward_is_invariant(models):
    ctx_q4 = _ctx(models["llama-q4"], [1, 2, 3, 4, 5])
    ctx_64 = _ctx(models["llama"], [1, 2, 3, 4, 5])
    p_q4 = _prepared(EarlyExit(exit=2, threshold=0.0), models["llama-q4"]).session().propose(ctx_q4)
    p_64 = _prepared(EarlyExit(exit=2, threshold=0.0), models["llama"]).session().propose(ctx_64)
    assert p_q4.resume is not None and p_q4.resume[0] == 2 and p_q4.resume[1].shape[1] == len(p_q4) + 1
    assert p_64.resume is None


def test_resumed_verify_gives_the_full_passes_logits_bitwise(models):
    """The exit-query cache: layers E+1.. from the draft's hidden state give the full verify pass's logits."""
    model = models["llama-q4"]
    ctx = _ctx(model, [7, 3, 9, 1, 4, 4, 2])
    start = ctx.cache.offset
    prop = _prepared(EarlyExit(exit=1, threshold=0.0), model).session().propose(dataclass_budget(ctx, 4))
    T = len(prop) + 1
    E, hidden = prop.resume
    pos = torch.arange(start, start + T)
    resumed = model(None, ctx.cache, hidden=hidden, positions=pos, layers=range(E + 1, model.num_layers)).logits
    ctx.cache.rewind(start)
    full = model(torch.tensor([[ctx.tokens[-1]] + prop.tokens]), ctx.cache, positions=pos).logits
    assert torch.equal(resumed, full)


def dataclass_budget(ctx, n):
    return DraftContext(ctx.tokens, n, ctx.model, ctx.cache)


def _prepared(drafter, model, text=None):
    """`drafter`, prepared for `model` (local text: `text`; None: no search)."""
    drafter.prepare(Resources(model=model, text=None if text is None else lambda: list(text)))
    return drafter


def _ctx(model, tokens):
    cache = model.make_cache(64)
    model(torch.tensor([tokens[:-1]]), cache)
    return DraftContext(list(tokens), 6, model, cache)


def test_draft_models_cache_is_rolled_back_with_the_targets(models):
    """After each step the draft model's cache holds exactly a prefix of the target's context, and its keys
    equal a fresh prefill of the draft model over those tokens."""
    target, small = models["llama"], models["draft"]
    d = _prepared(DraftModel(small, threshold=0.0), target)
    prompt = [5, 6, 7, 8, 5, 6, 7]
    toks, _ = decode(target, prompt, SamplingParams(max_new_tokens=20), d, CostModel.flat())
    s = d.session()  # a request's session, replayed over the decoded context
    s.begin(prompt)
    ctx = prompt + toks
    s.sync(ctx)
    fresh = small.make_cache(64)
    small(torch.tensor([ctx[:-1]]), fresh)
    for a, b in zip(s.held.cache, fresh):
        n = b.offset
        assert a.offset == n and torch.allclose(a.k[:, :, :n], b.k[:, :, :n], atol=1e-10)
    s.sync(ctx[:9])  # a rollback: keeps the common prefix only
    assert s.held.tokens == ctx[:8] and all(layer.offset == 8 for layer in s.held.cache)


@pytest.mark.parametrize("method", ["swift", "del", "draft"])
def test_sampling_distribution_is_preserved(method):
    """χ² on the law of the 2nd and 3rd generated tokens (drawn through draft verification steps)."""
    model = ours_from_hf(
        hf_model("llama", seed=21, vocab=12, hidden_size=32, intermediate_size=64, num_hidden_layers=3), torch.float64
    )
    small = ours_from_hf(hf_model("llama", seed=22, vocab=12, hidden_size=32, intermediate_size=64), torch.float64)
    make = {
        "swift": lambda: _prepared(Swift(skip="a1", threshold=0.0, save=False), model),
        "del": lambda: _prepared(EarlyExit(exit=1, threshold=0.0), model),
        "draft": lambda: _prepared(DraftModel(small, threshold=0.0), model),
    }[method]
    assert chi2_pvalue(model, [5, 0, 7, 2, 9, 4, 11, 1], _fixed(make(), 2)) > 1e-3


def test_draft_cost_counts_against_expected_tokens():
    free = CostSizer(CostModel.flat())
    assert free.more([0.9, 0.8])  # drafting costs nothing: go on while nodes may be accepted
    dear = CostSizer(CostModel.flat(), DraftCost())
    dear.draft.observe(1, 0.5, 1.0)  # a node costs half a plain step
    assert dear.draft.per_node == pytest.approx(0.5)
    assert dear.more([0.95]) and not dear.more([0.9, 0.5, 0.2])
    cheap = DraftCost()
    for _ in range(3):
        cheap.observe(4, 0.04, 1.0)
    assert cheap.per_node == pytest.approx(0.01)


def test_a_drafters_overconfident_scores_are_calibrated_by_what_verification_accepts():
    """Trust = accepted nodes per unit of score (EMA, at most 1): a drafter whose 0.9s are accepted a tenth as
    often as it claims gets its drafts sized as 0.09s."""
    cost = CostModel((1, 2, 4), (1.0, 1.3, 1.9))
    sizer = CostSizer(cost, DraftCost())
    chain = Proposal.chain([1, 2, 3], [0.9, 0.8, 0.7])
    assert sizer.trust == 1.0 and len(sizer.size(chain, 10)) == 3
    for _ in range(60):
        sizer.observe_accept(2.0, 0)  # two nodes' worth of score, nothing accepted
        sizer.observe_accept(2.0, 1)
    assert sizer.trust == pytest.approx(0.25, abs=0.05)
    assert len(sizer.size(chain, 10)) == 0  # (1 + 0.225) / 1.3 < 1: a plain step pays more
    for _ in range(60):
        sizer.observe_accept(1.0, 3)  # underconfident scores are not inflated
    assert sizer.trust == 1.0


def test_mix_merges_and_each_part_learns_its_own_nodes(models):
    model = models["llama"]
    seen = []

    from skipjack.drafters.base import Drafter, DraftSession, Resources

    class Fixed(Drafter):
        name = "fixed"

        def __init__(self, toks):
            self.toks = toks

        def session(self):
            return FixedSession(self.toks)

    class FixedSession(DraftSession):
        def __init__(self, toks):
            self.toks = toks

        def propose(self, ctx):
            return Proposal.chain(self.toks, [0.9, 0.8][: len(self.toks)])

        def observe(self, p, v):
            seen.append((p.tokens, v.path))

    mix = Mix("a+b", parts=[Fixed([1, 2]), Fixed([1, 3])])
    mix.prepare(Resources(model=model))
    session = mix.session()
    session.begin([5, 6, 7])
    ctx = _ctx(model, [5, 6, 7])
    merged = session.propose(ctx)
    assert merged.tokens[:1] == [1] and sorted(merged.tokens) == [1, 2, 3] and merged.parents.count(-1) == 1
    node = merged.tokens.index(1)
    session.observe(merged, Verdict([1, 3, 9], [node, merged.tokens.index(3)], [1, 3, 9, 9]))
    assert seen == [([1, 2], [0]), ([1, 3], [0, 1])]


def test_bad_input_is_one_line(models, tmp_path):
    cases = [
        lambda: make("draft"),
        lambda: make("draft:model=no-such-model"),
        lambda: make("swift:skip=x3"),
        lambda: make("del:threshold=1.5"),
        lambda: make("mix:of=pld"),
        lambda: make("mix:of=pld+nothing"),
        lambda: EarlyExit(exit=4).prepare(Resources(model=models["llama"])),
        lambda: Swift(skip="a4", save=False).prepare(Resources(model=models["llama"])),
        lambda: Swift().session().propose(_ctx(models["llama"], [1, 2, 3])),  # not prepared
        lambda: EarlyExit().prepare(Resources()),  # no model to draft with
        lambda: DraftHead(models["llama"], vocab=-1),
    ]
    for case in cases:
        with pytest.raises(SkipjackError) as e:
            case()
        assert "\n" not in str(e.value) and str(e.value)
    assert parse_skip("a1+f2") == {("attn", 1), ("ffn", 2)}


def test_mismatched_tokenizers_are_one_line():
    class Tok:
        def __init__(self, vocab):
            self.hf = type("H", (), {"get_vocab": lambda s: vocab})()

    class L:
        def __init__(self, name, vocab):
            self.name, self.tokenizer = name, Tok(vocab)

    check_tokenizers(L("a", {"x": 0, "y": 1}), L("b", {"x": 0, "y": 1}))
    with pytest.raises(SkipjackError, match="does not share") as e:
        check_tokenizers(L("a", {"x": 0, "y": 1}), L("b", {"x": 1, "y": 0}))
    assert "\n" not in str(e.value)


def test_humaneval_prompts_are_a_suite():
    from skipjack.bench.suite import load_suite, parse_peers

    he = load_suite("humaneval")
    assert len(he) == 9 and {p.category for p in he} == {"humaneval"}
    assert "def " in he[0].messages[-1]["content"]
    assert len(load_suite("code")) == len(load_suite("quick")) + 9
    assert parse_peers("hf-assist,hf-early-exit") == ["hf-assist", "hf-early-exit"]


def test_hf_assist_peer_needs_a_named_pair():
    from skipjack.bench.peers import Missing, _hf_peer

    class Loaded:
        name = "smollm2-135m"

    peer = _hf_peer("hf-assist", object(), Loaded(), torch.float32)
    assert isinstance(peer, Missing) and "no draft model" in peer.status
