"""Mock drafters for the lossless tests (always right, never right, random, and random trees), and `decode`,
which runs any method or drafter through the one decode generator."""

from __future__ import annotations

import random

import torch

from skipjack import methods
from skipjack.decoding.cost import CostModel
from skipjack.decoding.plan import Plan
from skipjack.decoding.proposal import Proposal
from skipjack.decoding.sequence import generate
from skipjack.decoding.sizing import CostSizer
from skipjack.drafters.base import Drafter, DraftSession, Resources
from skipjack.methods import Method, MethodSpec


def make(spec: str, model=None, tables: dict | None = None, **resources) -> Method:
    """A method as the engine makes one: parsed, built and prepared with `model` (and any other `Resources`
    field; `tables`: a store of shared n-gram tables, default its own)."""
    ms = MethodSpec.parse(spec)
    built = methods.build(ms)
    drafter = built if isinstance(built, Drafter) else None
    if drafter is not None:
        drafter.prepare(Resources(model=model, tables={} if tables is None else tables, **resources))
    m = Method.of(ms, drafter)
    return m


def plan_of(m: Method, cost=None, **kw) -> Plan:
    """A plan for one request of method `m` (a fresh strategy or drafter session), drafts sized by `cost`."""
    strategy = methods.build(m.spec) if m.spec.strategy_class is not None else None
    draft = m.drafter.session() if m.drafter is not None else None
    return Plan(draft, m.sizer(cost or CostModel.flat()), strategy, lossless=m.lossless, method=m.spec.spec, **kw)


def decode(model, prompt, params, method="plain", cost=None, session=None):
    """(tokens, steps) of `generate` with a method spec (`pld:k=3`: a fixed size) or a drafter object, its
    drafts sized by `cost` (default: a flat cost model, which verifies every node it is given)."""
    if isinstance(method, str):
        plan = plan_of(make(method, model), cost, session=session)
    else:
        plan = Plan(method.session(), CostSizer(cost or CostModel.flat()), session=session)
    steps = list(generate(model, prompt, params, plan))
    return [t for s in steps for t in s.tokens], steps


def greedy_continuation(model, context: list[int], n: int) -> list[int]:
    cache = model.make_cache(len(context) + n + 1)
    logits = model(torch.tensor([context]), cache, logits="last").logits[0, -1]
    out = []
    for _ in range(n):
        t = int(logits.argmax())
        out.append(t)
        logits = model(torch.tensor([[t]]), cache).logits[0, -1]
    return out


class _Base(Drafter, DraftSession):
    """A test drafter with no state across requests: its own session."""

    lossless = True

    def session(self):
        return self

    def begin(self, prompt):
        self.proposed = self.accepted = 0

    def observe(self, proposal, verdict):
        self.proposed += len(proposal)
        self.accepted += len(verdict.path)

    def end(self):
        pass


class AlwaysAccept(_Base):
    """Proposes the model's own greedy continuation: every node must be accepted."""

    name = "always"

    def __init__(self, model, k=5):
        self.model, self.k = model, k

    def propose(self, ctx):
        n = min(self.k, ctx.budget)
        return Proposal.chain(greedy_continuation(self.model, ctx.tokens, n), [0.99] * n) if n > 0 else None


class NeverAccept(_Base):
    """Proposes argmax + 1 at the first position: nothing can be accepted."""

    name = "never"

    def __init__(self, model, k=4):
        self.model, self.k = model, k

    def propose(self, ctx):
        n = min(self.k, ctx.budget)
        if n <= 0:
            return None
        right = greedy_continuation(self.model, ctx.tokens, 1)[0]
        vocab = self.model.lm_head.out_features
        return Proposal.chain([(right + 1) % vocab] + [0] * (n - 1), [0.9] * n)


class RandomDrafter(_Base):
    """Random chains or trees, some seeded with the true continuation so partial acceptance happens."""

    name = "random"

    def __init__(self, model, seed=0, tree=False, k=6):
        self.model, self.rng, self.tree, self.k = model, random.Random(seed), tree, k

    def propose(self, ctx):
        n = min(self.k, ctx.budget)
        if n <= 0:
            return None
        vocab = self.model.lm_head.out_features
        truth = greedy_continuation(self.model, ctx.tokens, n) if self.rng.random() < 0.6 else []
        cut = self.rng.randint(0, len(truth))
        tokens = truth[:cut] + [self.rng.randrange(vocab) for _ in range(n - cut)]
        if not self.tree:
            return Proposal.chain(tokens, [0.5] * n)
        parents = [-1] + [self.rng.randrange(-1, i) for i in range(1, n)]
        if cut > 1:  # keep the true prefix as a path
            parents[:cut] = list(range(-1, cut - 1))
        return Proposal(tokens, parents, [0.5] * n)


def chi2_pvalue(model, prompt: list[int], drafter, n: int = 2000, vocab: int = 12, top_k: int = 8) -> float:
    """χ² test of the law of the 2nd and 3rd tokens that `drafter` decodes (T = 1, top-k) against the exact law
    computed from the model; asserts that every request's second token came through a verify step."""
    from itertools import product

    from scipy.stats import chisquare

    from skipjack.decoding.sampling import SamplingParams, probs

    params = SamplingParams(temperature=1.0, top_k=top_k)

    def law_after(ctx):
        return probs(model(torch.tensor([ctx])).logits[0, -1][None], params)[0]

    law = dict.fromkeys(product(range(vocab), repeat=2), 0.0)
    first = law_after(prompt)
    for a in range(vocab):
        second = law_after(prompt + [a]) if first[a] > 0 else None
        for b in range(vocab) if second is not None else ():
            third = law_after(prompt + [a, b]) if second[b] > 0 else None
            for c in range(vocab) if third is not None else ():
                law[(b, c)] += float(first[a] * second[b] * third[c])
    counts, drafted = dict.fromkeys(law, 0), 0
    for i in range(n):
        toks, steps = decode(
            model, prompt, SamplingParams(temperature=1.0, top_k=top_k, max_new_tokens=3, seed=i), drafter
        )
        counts[(toks[1], toks[2])] += 1
        drafted += sum(s.drafted for s in steps)
    assert drafted >= n  # every request's second token came through a verify step
    keys = [k for k in law if law[k] > 0]
    exp = [law[k] * n for k in keys]
    assert sum(counts[k] for k in keys) == n
    big = [i for i, e in enumerate(exp) if e >= 5]
    obs = [counts[keys[i]] for i in big] + [n - sum(counts[keys[i]] for i in big)]
    e = [exp[i] for i in big] + [n - sum(exp[i] for i in big)]
    return chisquare(obs, e).pvalue


def drafter_or_spec(name: str, model, seed: int = 0):
    """A mock drafter by its test name (always, never, random, random-tree), or `name` itself: a method spec."""
    if name == "always":
        return AlwaysAccept(model)
    if name == "never":
        return NeverAccept(model)
    if name.startswith("random"):
        return RandomDrafter(model, seed, tree=name.endswith("tree"))
    return name
