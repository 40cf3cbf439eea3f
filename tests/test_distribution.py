"""Speculative sampling preserves plain sampling's distribution (chi-squared tests, fixed seeds).

1. Verifier level: the target is a Markov chain over 10 tokens (logits of each row depend on that row's
   token), so the exact law of the next 3 tokens is known. Drafts are chains, trees, and sampled drafts with
   their own q. 20,000 samples each, chi-squared goodness of fit against the exact law.
2. End to end: `generate()` with a tiny model (vocab 12) and pld/ngram drafters, next 2 tokens, against the
   exact law computed from the model's own logits (4,000 samples each: the pipeline check; the 20,000-sample
   tests above carry the statistical weight).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from skipjack.decoding.proposal import Proposal
from skipjack.decoding.sampling import SamplingParams, probs
from skipjack.decoding.sequence import generate
from skipjack.decoding.verify import verify

V = 10
SETTINGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=6, top_p=0.9, min_p=0.05),
]


def chi2_pvalue(samples: list[tuple[int, ...]], law: dict[tuple[int, ...], float]) -> float:
    """Goodness of fit; cells with expected count < 5 are pooled into one."""
    n = len(samples)
    counts: dict = {}
    for s in samples:
        counts[s] = counts.get(s, 0) + 1
    assert set(counts) <= {k for k, p in law.items() if p > 0}, "sampled a token sequence of probability 0"
    big = [k for k, p in law.items() if p * n >= 5]
    obs = [counts.get(k, 0) for k in big]
    exp = [law[k] * n for k in big]
    rest_exp = n - sum(exp)
    if rest_exp > 1e-9:
        obs.append(n - sum(obs))
        exp.append(rest_exp)
    return float(chisquare(obs, exp).pvalue)


def markov(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V + 1, V, generator=g, dtype=torch.float64) * 1.5  # row V = the root's context


def exact_law(table, params, n=3):
    p = {tok: probs(table[tok][None], params)[0] for tok in range(V + 1)}
    law = {}
    for seq in itertools.product(range(V), repeat=n):
        pr, prev = 1.0, V
        for t in seq:
            pr *= float(p[prev][t])
            prev = t
        law[seq] = pr
    return law


def draft_chain(rng, k):
    return Proposal.chain([int(x) for x in torch.randint(0, V, (k,), generator=rng)])


def draft_tree(rng, k):
    toks = [int(x) for x in torch.randint(0, V, (k,), generator=rng)]
    parents = [-1] + [int(torch.randint(-1, i, (1,), generator=rng)) for i in range(1, k)]
    return Proposal(toks, parents)


def draft_sampled(rng, k, table, params):
    """A drafter with its own distribution q (a perturbed target), sampling a chain from it."""
    toks, qs, prev = [], [], V
    for _ in range(k):
        q = probs((table[prev] + torch.randn(V, generator=rng, dtype=torch.float64))[None], SamplingParams(1.0))[0]
        t = int(torch.multinomial(q, 1, generator=rng))
        toks.append(t)
        qs.append(q)
        prev = t
    return Proposal.chain(toks, q=torch.stack(qs))


def sample_three(table, params, kind, rng, n_samples):
    out = []
    for _ in range(n_samples):
        seq = []
        while len(seq) < 3:
            k = int(torch.randint(1, 5, (1,), generator=rng))
            if kind == "chain":
                prop = draft_chain(rng, k)
            elif kind == "tree":
                prop = draft_tree(rng, k + 2)
            else:
                prop = draft_sampled(rng, k, table, params)
            root = seq[-1] if seq else V
            rows = [root] + prop.tokens
            logits = table[rows]  # [T, V]: each row's logits depend on that row's token only
            seq += verify(logits, prop, params, rng).tokens
        out.append(tuple(seq[:3]))
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids OpenMP overhead (and oversubscription on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize(
    "kind, params",
    [("chain", SETTINGS[1]), ("tree", SETTINGS[1]), ("tree", SETTINGS[0]), ("sampled-q", SETTINGS[0])],
    ids=["chain-warped", "tree-warped", "tree-t1", "sampled-q-t1"],
)
def test_verifier_preserves_distribution(kind, params):
    table = markov(seed=11)
    rng = torch.Generator().manual_seed(1234)
    samples = sample_three(table, params, kind, rng, 20_000)
    assert chi2_pvalue(samples, exact_law(table, params)) > 1e-3


def test_chi2_detects_a_biased_sampler():
    """The test has power: greedy-biased 'sampling' (always accept the draft) is rejected."""
    table = markov(seed=11)
    params = SETTINGS[0]
    rng = torch.Generator().manual_seed(5)
    samples = []
    for _ in range(20_000):
        prop = draft_chain(rng, 3)
        samples.append(tuple(prop.tokens))  # accept everything: wrong
    assert chi2_pvalue(samples, exact_law(table, params)) < 1e-6


def tiny_vocab_model():
    from conftest import hf_model, ours_from_hf

    return ours_from_hf(hf_model("llama", seed=21, vocab=12, hidden_size=32, intermediate_size=64), torch.float64)


@pytest.mark.parametrize("method", ["pld", "ngram"])
def test_end_to_end_sampling_distribution(method):
    """Law of the 2nd and 3rd generated tokens (the first comes from the prefill, the next ones from draft
    verification steps), summed over the first token."""
    from drafters_mock import make, plan_of

    model = tiny_vocab_model()
    params = SamplingParams(temperature=1.0, top_k=8)
    prompt = [5, 0, 7, 2, 9, 4, 11, 1, 6, 3, 10, 8, 5, 0, 7]  # every token has a successor: both drafters propose

    def next_law(ctx):
        return probs(model(torch.tensor([ctx])).logits[0, -1][None], params)[0]

    law = dict.fromkeys(itertools.product(range(12), repeat=2), 0.0)
    first = next_law(prompt)
    for a in range(12):
        if first[a] == 0:
            continue
        second = next_law(prompt + [a])
        for b in range(12):
            if second[b] == 0:
                continue
            third = next_law(prompt + [a, b])
            for c in range(12):
                law[(b, c)] += float(first[a] * second[b] * third[c])
    m = make(method + ":k=3", model)
    samples, drafted, accepted = [], 0, 0
    for i in range(4_000):
        gen_params = SamplingParams(temperature=1.0, top_k=8, max_new_tokens=4, seed=i)
        steps = list(generate(model, prompt, gen_params, plan_of(m)))
        drafted += sum(s.drafted for s in steps)
        accepted += sum(s.accepted for s in steps)
        toks = [t for s in steps for t in s.tokens]
        samples.append(tuple(toks[1:3]))
    assert drafted > 4000 and accepted > 400  # the tested tokens often come from accepted drafts
    assert chi2_pvalue(samples, law) > 1e-3
