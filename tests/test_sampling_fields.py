"""OpenAI's logit_bias, frequency and presence penalties, vLLM's ignore_eos and min_tokens: plain decoding
honours them, and speculation stays exact under them (greedy identity for every drafter, chains and trees; a
χ² test of the verifier's law with a history-dependent target)."""

from __future__ import annotations

import itertools

import pytest
import torch
from drafters_mock import RandomDrafter, decode, drafter_or_spec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_distribution import V, chi2_pvalue, draft_chain, draft_tree, markov

from skipjack.decoding.sampling import SamplingParams, adjust, probs
from skipjack.decoding.verify import verify
from skipjack.errors import SkipjackError
from skipjack.server import protocol

DRAFTERS = ["pld", "ngram", "pld:k=3", "ngram:k=5,width=2", "always", "never", "random", "random-tree"]
FIELDS = [
    {"logit_bias": {3: 4.0, 7: -100.0, 11: 2.5}},
    {"frequency_penalty": 1.5},
    {"frequency_penalty": -0.7},
    {"presence_penalty": 2.0},
    {"presence_penalty": -1.0, "frequency_penalty": 0.8, "logit_bias": {5: 3.0}},
    {"min_tokens": 6},
    {"min_tokens": 4, "frequency_penalty": 0.5, "repetition_penalty": 1.3},
    {"ignore_eos": True},
]


make = drafter_or_spec


prompts = st.lists(st.integers(0, 47), min_size=1, max_size=16).flatmap(
    lambda base: st.integers(1, 3).map(lambda r: (base * r)[:32])
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=prompts,
    max_new=st.integers(6, 24),
    fields=st.sampled_from(FIELDS),
    drafter=st.sampled_from(DRAFTERS),
    family=st.sampled_from(["llama", "gemma"]),
    seed=st.integers(0, 10_000),
    stop_at=st.one_of(st.none(), st.integers(0, 23)),
)
def test_greedy_identity_under_the_fields(
    tiny_llama64, tiny_gemma64, prompt, max_new, fields, drafter, family, seed, stop_at
):
    """Every drafter gives plain greedy's tokens. `stop_at` makes a token of the free output a stop token, so
    that min_tokens's mask and ignore_eos act (often inside a verify step's accepted tokens)."""
    model = tiny_llama64 if family == "llama" else tiny_gemma64
    stops = frozenset()
    if stop_at is not None:
        free, _ = decode(model, prompt, SamplingParams(max_new_tokens=max_new, **fields))
        stops = frozenset({free[stop_at % len(free)]})
    params = SamplingParams(max_new_tokens=max_new, stop_token_ids=stops, **fields)
    plain, _ = decode(model, prompt, params)
    spec, steps = decode(model, prompt, params, make(drafter, model, seed))
    assert spec == plain
    assert steps[-1].finish in ("stop", "length")
    if fields.get("min_tokens") and stops:
        assert not set(plain[: fields["min_tokens"]]) & stops
        assert len(plain) >= min(fields["min_tokens"], max_new)


def test_logit_bias_bans_and_forces(tiny_llama64):
    prompt = [1, 2, 3, 4, 1, 2, 3, 4]
    free, _ = decode(tiny_llama64, prompt, SamplingParams(max_new_tokens=16))
    banned = {t: -100.0 for t in set(free)}
    for method in ["plain", "pld", RandomDrafter(tiny_llama64, 3, tree=True)]:
        out, _ = decode(tiny_llama64, prompt, SamplingParams(max_new_tokens=16, logit_bias=banned), method)
        assert not set(out) & set(banned)
        forced, _ = decode(tiny_llama64, prompt, SamplingParams(max_new_tokens=8, logit_bias={9: 100.0}), method)
        assert forced == [9] * 8
    for seed in range(20):  # sampled too: a -100 bias leaves a banned token a negligible chance
        p = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=8, logit_bias=banned)
        out, _ = decode(tiny_llama64, prompt, p, RandomDrafter(tiny_llama64, seed))
        assert not set(out) & set(banned)


def test_penalties_follow_openais_definition():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    counts = torch.tensor([[0.0, 1.0, 3.0, 0.0]], dtype=torch.float64)
    p = SamplingParams(frequency_penalty=0.5, presence_penalty=1.25, logit_bias={0: 2.0})
    out = adjust(logits, p, None, counts, torch.tensor([4]))
    assert out.tolist() == [[3.0, 2.0 - 0.5 - 1.25, 3.0 - 1.5 - 1.25, 4.0]]


def test_ignore_eos_and_min_tokens(tiny_llama64):
    prompt = [5, 6, 7, 8]
    free, _ = decode(tiny_llama64, prompt, SamplingParams(max_new_tokens=12))
    stop = free[2]
    first = free.index(stop)
    stops = frozenset({stop})
    out, steps = decode(tiny_llama64, prompt, SamplingParams(max_new_tokens=12, stop_token_ids=stops))
    assert out == free[:first] and steps[-1].finish == "stop"
    out, steps = decode(tiny_llama64, prompt, SamplingParams(max_new_tokens=12, stop_token_ids=stops, ignore_eos=True))
    assert out == free and steps[-1].finish == "length"
    p = SamplingParams(max_new_tokens=12, stop_token_ids=stops, min_tokens=first + 3)
    out, _ = decode(tiny_llama64, prompt, p)
    assert len(out) >= first + 3 and stop not in out[: first + 3]
    assert out[:first] == free[:first] and out[first] != stop  # masked where plain would have stopped


def _law(table, params, counts0, gen0, n=3):
    """Exact law of the next n tokens of the Markov target under `params`, from a history (counts, generated)."""
    law = {}
    for seq in itertools.product(range(V), repeat=n):
        pr, prev, counts = 1.0, V, counts0.clone()
        for i, t in enumerate(seq):
            row = adjust(table[prev][None], params, None, counts[None], torch.tensor([gen0 + i]))
            pr *= float(probs(row, params)[0, t])
            counts[t] += 1
            prev = t
        law[seq] = pr
    return law


@pytest.mark.parametrize("kind", ["chain", "tree"])
def test_verifier_law_under_penalties_bias_and_min_tokens(kind):
    """Rejection sampling over chains and trees, each row's target computed along its own path, keeps the law of
    plain sampling when the target depends on the history (penalties, min_tokens) and a bias."""
    torch.set_num_threads(1)
    table = markov(seed=5)
    params = SamplingParams(
        temperature=1.0,
        frequency_penalty=1.2,
        presence_penalty=0.6,
        logit_bias={2: 1.5, 5: -100.0},
        min_tokens=3,
        max_new_tokens=8,
        stop_token_ids=frozenset({4}),
    )
    counts0 = torch.zeros(V, dtype=torch.float64)
    counts0[1] = 1.0  # generated so far: token 1
    gen0 = 1
    rng = torch.Generator().manual_seed(99)
    samples = []
    for _ in range(5000):
        seq, counts = [], counts0.clone()
        while len(seq) < 3:
            k = int(torch.randint(1, 5, (1,), generator=rng))
            prop = draft_chain(rng, k) if kind == "chain" else draft_tree(rng, k + 2)
            logits = table[[seq[-1] if seq else V] + prop.tokens]
            toks = verify(logits, prop, params, rng, None, None, counts, gen0 + len(seq)).tokens
            for t in toks:
                counts[t] += 1
            seq += toks
        samples.append(tuple(seq[:3]))
    law = _law(table, params, counts0, gen0)
    assert all(s[0] != 4 and s[1] != 4 and 5 not in s for s in samples)  # min_tokens = 3 with gen0 = 1
    assert chi2_pvalue(samples, law) > 1e-3


@pytest.mark.parametrize(
    "kw, says",
    [
        ({"logit_bias": {3: float("nan")}}, "finite"),
        ({"logit_bias": {3: float("inf")}}, "finite"),
        ({"logit_bias": {3: 101.0}}, "[-100, 100]"),
        ({"logit_bias": {-1: 1.0}}, "token id"),
        ({"logit_bias": {"3": 1.0}}, "integer"),
        ({"logit_bias": [3]}, "map"),
        ({"frequency_penalty": 2.5}, "[-2, 2]"),
        ({"presence_penalty": float("nan")}, "finite"),
        ({"ignore_eos": 1}, "true or false"),
        ({"min_tokens": -1}, "min tokens"),
        ({"min_tokens": 300, "max_new_tokens": 256}, "min tokens"),
    ],
)
def test_hostile_values_are_one_line_errors(kw, says):
    with pytest.raises(SkipjackError) as e:
        SamplingParams(**kw)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_out_of_vocabulary_bias_is_refused(tiny_llama64):
    with pytest.raises(SkipjackError, match=r"outside the vocabulary \[0, 48\)"):
        decode(tiny_llama64, [1, 2], SamplingParams(logit_bias={48: 1.0}))


def test_protocol_maps_the_fields():
    body = protocol.Chat.model_validate_json(
        '{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"17": -100, "3": 2.5},'
        ' "frequency_penalty": 0.5, "presence_penalty": -0.25, "ignore_eos": true, "min_tokens": 2}'
    )
    p = protocol.params(body, 16, None, frozenset({1}), None)
    assert p.logit_bias == {17: -100.0, 3: 2.5}
    assert (p.frequency_penalty, p.presence_penalty, p.ignore_eos, p.min_tokens) == (0.5, -0.25, True, 2)
    plain = protocol.params(
        protocol.Chat.model_validate_json('{"messages": [{"role": "user", "content": "x"}]}'),
        16,
        None,
        frozenset(),
        None,
    )
    assert not plain.adjusted
    for bad in ['{"x": 1}', '{"1e9999": 1}', '{"' + "9" * 40 + '": 1}']:
        body = protocol.Chat.model_validate_json(
            '{"messages": [{"role": "user", "content": "x"}], "logit_bias": ' + bad + "}"
        )
        with pytest.raises(SkipjackError, match="token id"):
            protocol.params(body, 16, None, frozenset(), None)
