"""Drafting with the model's own layers (`swift`, `del`), with a smaller model (`draft`), merged trees (`mix`):
lossless (greedy identity, the distribution under sampling, the cache after rollback), deterministic
searches and estimates that prefer what scores better, draft cost in the sizer, and one-line errors."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_model, ours_from_hf
from drafters_mock import chi2_pvalue, decode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skipjack.decoding.cost import CostModel
from skipjack.decoding.proposal import DraftContext, Proposal, Verdict
from skipjack.decoding.sampling import SamplingParams
from skipjack.decoding.session import Session
from skipjack.decoding.sizing import CostSizer, DraftCost
from skipjack.drafters import REGISTRY, make_method
from skipjack.drafters.draft_model import DraftModel, check_tokenizers
from skipjack.drafters.early_exit import EarlyExit
from skipjack.drafters.layered import DraftHead
from skipjack.drafters.mix import Mix
from skipjack.drafters.swift import Swift, parse_skip, value
from skipjack.errors import SkipjackError
from skipjack.weights.linear import rows


def deep(family: str, weights=None, dtype=torch.float32, seed=3, layers=5, vocab=48):
    kind = "gemma3_text" if family == "gemma" else "llama"
    hf = hf_model(kind, seed=seed, vocab=vocab, num_hidden_layers=layers)
    return ours_from_hf(hf, dtype if weights is None else torch.float32, weights)


@pytest.fixture(scope="module")
def models():
    """5-layer tiny models: fp64 (exact by precision) and q4 (exact by the batch-invariant forward)."""
    out = {f: deep(f, dtype=torch.float64) for f in ("llama", "gemma")}
    out |= {f + "-q4": deep(f, weights="q4") for f in ("llama", "gemma")}
    out["draft"] = deep("llama", dtype=torch.float64, seed=9, layers=2)  # a sibling for `draft`
    out["draft-q4"] = deep("llama", weights="q4", seed=9, layers=2)
    return out


def drafter(name: str, models: dict, family: str):
    """Self-drafts forced to draft on random weights (fixed sets, threshold 0), and a small draft model."""
    q4 = family.endswith("q4")
    if name == "draft":
        return DraftModel(models["draft-q4" if q4 else "draft"], threshold=0.0)
    if name == "mix":
        reg = {"pld": REGISTRY["pld"], "swift": lambda: Swift(skip="a1+f3", threshold=0.0, save=False)}
        return Mix("pld+swift", registry=reg)
    return make_method(name).drafter


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
    """A drafter whose budget is capped at k (a fixed draft size)."""

    class Capped:
        lossless, name = True, d.name

        def begin(self, prompt):
            d.begin(prompt)

        def end(self):
            d.end()

        def propose(self, ctx):
            return d.propose(DraftContext(ctx.tokens, min(ctx.budget, k), ctx.model, ctx.cache, ctx.more))

        def observe(self, p, v):
            d.observe(p, v)

    return Capped()


def _session_cache(model, prompt, params, d):
    s = Session()
    decode(model, prompt, params, d, CostModel.flat(), session=s)
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
    p_q4 = EarlyExit(exit=2, threshold=0.0).propose(ctx_q4)
    p_64 = EarlyExit(exit=2, threshold=0.0).propose(ctx_64)
    assert p_q4.resume is not None and p_q4.resume[0] == 2 and p_q4.resume[1].shape[1] == len(p_q4) + 1
    assert p_64.resume is None


def test_resumed_verify_gives_the_full_passes_logits_bitwise(models):
    """The exit-query cache: layers E+1.. from the draft's hidden state give the full verify pass's logits."""
    model = models["llama-q4"]
    ctx = _ctx(model, [7, 3, 9, 1, 4, 4, 2])
    start = ctx.cache.offset
    prop = EarlyExit(exit=1, threshold=0.0).propose(dataclass_budget(ctx, 4))
    T = len(prop) + 1
    E, hidden = prop.resume
    pos = torch.arange(start, start + T)
    resumed = model(None, ctx.cache, hidden=hidden, positions=pos, layers=range(E + 1, model.num_layers)).logits
    ctx.cache.rewind(start)
    full = model(torch.tensor([[ctx.tokens[-1]] + prop.tokens]), ctx.cache, positions=pos).logits
    assert torch.equal(resumed, full)


def dataclass_budget(ctx, n):
    return DraftContext(ctx.tokens, n, ctx.model, ctx.cache)


def _ctx(model, tokens):
    cache = model.make_cache(64)
    model(torch.tensor([tokens[:-1]]), cache)
    return DraftContext(list(tokens), 6, model, cache)


def test_draft_models_cache_is_rolled_back_with_the_targets(models):
    """After each step the draft model's cache holds exactly a prefix of the target's context, and its keys
    equal a fresh prefill of the draft model over those tokens."""
    target, small = models["llama"], models["draft"]
    d = DraftModel(small, threshold=0.0)
    prompt = [5, 6, 7, 8, 5, 6, 7]
    toks, _ = decode(target, prompt, SamplingParams(max_new_tokens=20), d, CostModel.flat())
    held = list(d.held)
    assert held == (prompt + toks)[: len(held)] or d.cache is None  # `end` cleared it; replay to check below
    d.begin(prompt)
    ctx = prompt + toks
    d.sync(ctx)
    fresh = small.make_cache(64)
    small(torch.tensor([ctx[:-1]]), fresh)
    for a, b in zip(d.cache, fresh):
        n = b.offset
        assert a.offset == n and torch.allclose(a.k[:, :, :n], b.k[:, :, :n], atol=1e-10)
    d.sync(ctx[:9])  # a rollback: keeps the common prefix only
    assert d.held == ctx[:8] and all(layer.offset == 8 for layer in d.cache)


@pytest.mark.parametrize("method", ["swift", "del", "draft"])
def test_sampling_distribution_is_preserved(method):
    """χ² on the law of the 2nd and 3rd generated tokens (drawn through draft verification steps)."""
    model = ours_from_hf(
        hf_model("llama", seed=21, vocab=12, hidden_size=32, intermediate_size=64, num_hidden_layers=3), torch.float64
    )
    small = ours_from_hf(hf_model("llama", seed=22, vocab=12, hidden_size=32, intermediate_size=64), torch.float64)
    make = {
        "swift": lambda: Swift(skip="a1", threshold=0.0, save=False),
        "del": lambda: EarlyExit(exit=1, threshold=0.0),
        "draft": lambda: DraftModel(small, threshold=0.0),
    }[method]
    assert chi2_pvalue(model, [5, 0, 7, 2, 9, 4, 11, 1], _fixed(make(), 2)) > 1e-3


def test_swift_search_is_deterministic_and_prefers_the_better_set(models, monkeypatch):
    model = models["llama"]
    ctx = _ctx(model, list(range(3, 40)))
    a, b = Swift(save=False, search=12), Swift(save=False, search=12)
    a.propose(ctx), b.propose(ctx)
    assert a.skip == b.skip and a.evals == b.evals  # deterministic under a seed
    good = frozenset({("attn", 1), ("ffn", 2), ("ffn", 3)})
    s = Swift(save=False, search=40, patience=40)
    s._setup(model, ctx.tokens)
    s.times = (1.0, 0.1, 0.1)
    rest = [c for c in s.candidates if c not in good]
    monkeypatch.setattr(s, "reference", lambda ctx: ([], sorted(good) + rest))
    monkeypatch.setattr(s, "score", lambda ctx, skip, truth: 0.95 if skip == good else 0.9 - 0.3 * len(skip - good))
    s.optimise(ctx, 40, scan=True)
    assert s.skip == good and s.pays()  # the best-scoring set, over its subsets (cheaper) and supersets


def test_swift_value_grows_with_match_and_falls_with_cost():
    assert value(0.9, 0.5) > value(0.7, 0.5) > value(0.7, 0.9)
    assert value(1.0, 1.0) == pytest.approx(1.0)  # drafting with the whole model never pays
    assert value(0.0, 0.3) == 1.0


def test_swift_saves_and_reuses_its_set(models, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPJACK_HOME", str(tmp_path))
    model = models["llama"]
    ctx = _ctx(model, list(range(3, 40)))
    first = Swift(search=6)
    first.propose(ctx)
    again = Swift(search=6, refine=0)
    again._setup(model, ctx.tokens)
    assert again.skip == first.skip and again.todo == 0  # loaded, not searched


def test_del_picks_the_layer_with_higher_shadow_acceptance(models):
    d = EarlyExit()
    d._setup(models["llama"], [1, 2])
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
    decode(model, prompt, SamplingParams(max_new_tokens=30), d, CostModel.flat())
    assert sum(d.seen) > 0 and all(0 <= h <= s for h, s in zip(d.hits, d.seen))
    again = EarlyExit(probe_every=1)
    decode(model, prompt, SamplingParams(max_new_tokens=30), again, CostModel.flat())
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


def test_mix_merges_and_each_part_learns_its_own_nodes(models):
    model = models["llama"]
    seen = []

    class Fixed:
        name, lossless = "fixed", True

        def __init__(self, toks):
            self.toks = toks

        def begin(self, prompt):
            pass

        def end(self):
            pass

        def propose(self, ctx):
            return Proposal.chain(self.toks, [0.9, 0.8][: len(self.toks)])

        def observe(self, p, v):
            seen.append((p.tokens, v.path))

    mix = Mix("a+b", registry={"a": lambda: Fixed([1, 2]), "b": lambda: Fixed([1, 3])})
    ctx = _ctx(model, [5, 6, 7])
    merged = mix.propose(ctx)
    assert merged.tokens[:1] == [1] and sorted(merged.tokens) == [1, 2, 3] and merged.parents.count(-1) == 1
    node = merged.tokens.index(1)
    mix.observe(merged, Verdict([1, 3, 9], [node, merged.tokens.index(3)], [1, 3, 9, 9]))
    assert seen == [([1, 2], [0]), ([1, 3], [0, 1])]


def test_bad_input_is_one_line(models, tmp_path):
    cases = [
        lambda: make_method("draft"),
        lambda: make_method("draft:model=no-such-model"),
        lambda: make_method("swift:skip=x3"),
        lambda: make_method("del:threshold=1.5"),
        lambda: make_method("mix:of=pld"),
        lambda: make_method("mix:of=pld+nothing"),
        lambda: EarlyExit(exit=4).propose(_ctx(models["llama"], [1, 2, 3])),
        lambda: Swift(skip="a4", save=False).propose(_ctx(models["llama"], [1, 2, 3])),
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


def test_deepcopy_keeps_learned_state_and_shares_the_models(models):
    """The bench snapshots drafters between repeats: the copy shares the models, not what was learned."""
    import copy

    d = EarlyExit(probe_every=1)
    decode(models["llama-q4"], [1, 2, 3, 4, 1, 2], SamplingParams(max_new_tokens=12), d, CostModel.flat())
    c = copy.deepcopy(d)
    assert c.model is d.model and c.head is d.head and c.seen == d.seen and c.seen is not d.seen
    m = DraftModel(models["draft"], threshold=0.0)
    assert copy.deepcopy(m).model is m.model


def test_mix_hands_model_to_the_parts_that_draft_with_one():
    got = {}

    def with_model(model="", shared=None):
        got["model"] = model
        return REGISTRY["pld"]()

    m = Mix("pld+d", model="qwen2.5-coder-0.5b", registry={"pld": REGISTRY["pld"], "d": with_model})
    assert got["model"] == "qwen2.5-coder-0.5b" and len(m.parts) == 2
    assert m.cost_prior == 0.0  # neither part has a prior: pld drafts for free
