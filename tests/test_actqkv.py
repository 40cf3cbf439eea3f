"""ActQKV (`--kv actqkv`): the Activation Bias and the probe query it weights, the probe's key scores, the
dynamic cut-off (layer budgets by information density), the query moments counted once per accepted row
(speculation exact with decode-time compression), its options' errors and its lossy label. What every
evicting policy must do (budget 1 is the full cache, eviction shrinks the tensors, rollback, speculation) is
checked for it by tests/test_kvpolicies.py, which picks it up from the registry."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from drafters_mock import AlwaysAccept, RandomDrafter
from test_kvpolicies import PROMPT, evicting, oracles, plain, run

from skipjack.cache import LayerSpec
from skipjack.decoding.sampling import SamplingParams
from skipjack.decoding.session import prefill
from skipjack.errors import SkipjackError
from skipjack.kvpolicies import make_policy
from skipjack.kvpolicies.actqkv import HIGH, LOW, ActLayerKV, ActQKV, density, share
from skipjack.kvpolicies.base import pooled

L = len(PROMPT)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _layer(window: int = 8, T: int = 100, seed: int = 0, outlier: int | None = None) -> tuple[ActLayerKV, dict]:
    """A 2-KV-head layer (4 query heads of 8 dims) that has seen one prompt pass of T random queries (a pass of
    more than SMALL rows: counted at once); with `outlier`, that window row gets one huge channel."""
    g = torch.Generator().manual_seed(seed)
    spec = LayerSpec(index=0, batch=1, heads=2, head_dim=8, capacity=256, window=None, dtype=torch.float32)
    layer = ActQKV(budget=0.5, window=window).layer(spec)
    k, v = torch.randn(1, 2, T, 8, generator=g), torch.randn(1, 2, T, 8, generator=g)  # [1, H_kv, T, D]
    q = torch.randn(1, T, 4, 8, generator=g)  # [1, T, H, D]
    if outlier is not None:
        q[0, T - window + outlier, 1, 3] = 40.0
    keys, _, _ = layer.update(k, v, 0)
    layer.observe(q, keys, None, 8**-0.5)
    return layer, {"q": q, "k": k}


def test_probe_is_the_window_weighted_by_activation_bias():
    layer, t = _layer()
    rows = t["q"][0].reshape(100, 32).double()  # [T, H * D]: every query the layer saw
    mean, var = layer.channel_stats()
    assert layer.rows == 100
    torch.testing.assert_close(mean, rows.mean(0))
    torch.testing.assert_close(var, rows.var(0, unbiased=False))
    win = rows[-8:]  # [W, H * D]
    phi = ((win - mean) ** 2 / (var + var.mean() / 100)).mean(1)  # [W]
    w = phi / phi.sum()
    want = (w.float()[:, None, None] * t["q"][0, -8:]).sum(0)  # [H, D]
    torch.testing.assert_close(layer.probe(), want)
    assert not torch.allclose(layer.probe(), t["q"][0, -8:].mean(0))  # not the plain mean of the window


def test_an_outlier_token_leads_the_probe():
    """A window token with an outlier activation carries most of the weight: the probe leans to its query."""
    layer, t = _layer(outlier=5)
    p, q = layer.probe(), t["q"][0, -8:]  # [H, D], [W, H, D]
    cos = torch.nn.functional.cosine_similarity(p.flatten()[None], q.flatten(1))  # [W]
    assert int(cos.argmax()) == 5 and float(cos[5]) > 0.9


def test_scores_are_the_probe_attention_pooled():
    layer, t = _layer()
    p = layer.probe()  # [H, D]
    logits = torch.einsum("hd,hnd->hn", p, t["k"][0].repeat_interleave(2, 0)) * 8**-0.5  # [H, n]
    want = logits.softmax(-1).view(2, 2, -1).mean(1)  # [H_kv, n]: each KV head's 2 query heads
    torch.testing.assert_close(layer.probe_attention(8**-0.5), want)
    torch.testing.assert_close(want.sum(1), torch.ones(2))
    policy = ActQKV(window=8, kernel=3)
    torch.testing.assert_close(policy.scores(layer, 8**-0.5), pooled(want, 3))


def test_density_is_the_normalised_entropy_before_the_window():
    flat = torch.full((2, 20), 1 / 20)
    assert density(flat, 4) == pytest.approx(1.0)
    peaked = torch.zeros(2, 20)
    peaked[:, 3] = 0.5
    peaked[:, 16:] = 0.125  # the window's mass is left out: over the candidates, one key holds it all
    assert density(peaked, 4) == pytest.approx(0.0, abs=1e-9)
    half = torch.zeros(2, 20)
    half[:, :8] = 1 / 8  # uniform over 8 of the 16 candidates: log 8 / log 16
    assert density(half, 4) == pytest.approx(0.75)
    assert density(torch.ones(2, 5) / 5, 4) == 0.0  # one candidate: nothing to spread over


def test_share_follows_the_weights_within_the_bounds():
    assert share([1.0, 2.0, 3.0, 2.0], 80, [1] * 4, [100] * 4) == [10, 20, 30, 20]
    assert share([1.0, 1.0, 10.0, 0.0], 80, [10] * 4, [40] * 4) == [15, 15, 40, 10]  # capped, floored, the rest
    assert share([0.0, 0.0], 10, [1, 1], [9, 9]) == [5, 5]  # no weight: an equal share
    assert share([1.0, 1.0], 100, [1, 1], [20, 30]) == [20, 30]  # the bounds cannot give more


@pytest.fixture(scope="module")
def llama4():
    from conftest import hf_model, ours_from_hf

    return ours_from_hf(hf_model("llama", seed=4, vocab=48, num_hidden_layers=4), weights="q4")


def test_layer_budgets_follow_information_density(llama4):
    """The dynamic cut-off: out of budget x context x layers, a layer whose probe spreads its attention wider
    keeps more keys, within [LOW, HIGH] x the mean."""
    whole = prefill(llama4, PROMPT, 10, policy=make_policy("actqkv:budget=1.0,every=1000000")).cache
    scale = whole.scale
    eta = [density(layer.probe_attention(scale), 32) for layer in evicting(whole)]
    cut = prefill(llama4, PROMPT, 10, policy=make_policy("actqkv:budget=0.3")).cache
    keep = math.ceil(0.3 * L)
    ns = [layer.n for layer in evicting(cut)]
    assert len(set(ns)) > 1, ns  # not uniform
    assert 4 * keep - 4 <= sum(ns) <= 4 * keep
    assert all(math.ceil(LOW * keep) <= n <= HIGH * keep for n in ns), ns
    order = sorted(range(4), key=lambda i: eta[i])
    assert [ns[i] for i in order] == sorted(ns), (eta, ns)
    for layer in evicting(cut):
        assert layer.k.shape[2] < L and layer.holes  # the tensors shrank


def test_moments_count_each_accepted_row_once(model):
    """Rows rolled back add nothing; accepted ones add once, in position order: after speculation (decode-time
    compression on) the tokens and each layer's moments are plain decoding's, bit for bit."""
    spec = "actqkv:budget=0.3,window=8,every=8"
    params = SamplingParams(max_new_tokens=24)
    ends = {}
    truth = plain(model, spec, params)
    assert truth != plain(model, None, params)
    drafters = oracles(truth)
    for label, d in [("plain", None), *drafters.items(), ("model", AlwaysAccept(model, 5))]:
        policy = make_policy(spec)
        seen = []
        compress = policy.compress
        policy.compress = lambda cache, seen=seen, compress=compress: (seen.append(cache), compress(cache))
        tokens, steps = run(model, policy, d, params=params)
        assert tokens == truth, label
        assert len(seen) > 2, label  # compressed after the prompt and while decoding
        if d is not None:
            assert sum(s.drafted for s in steps) > 0, label
        layers, end = evicting(seen[-1]), L + len(truth) - 1  # the last token's key is never written
        for layer in layers:
            layer._commit(end)  # rows past it (a last draft's) were never accepted
            assert layer.rows == end, label
        ends[label] = [(layer.s1.clone(), layer.s2.clone()) for layer in layers]
    for label, got in ends.items():
        for (a1, a2), (b1, b2) in zip(got, ends["plain"]):
            assert torch.equal(a1, b1) and torch.equal(a2, b2), label


def test_speculation_with_a_tree_drafter_and_a_short_prompt(model):
    """A prompt of at most SMALL tokens: its rows wait to be accepted, like a verify pass's."""
    prompt, spec = PROMPT[:50], "actqkv:budget=0.3,window=8,every=8"
    base = plain(model, spec, prompt=prompt)
    assert base != plain(model, None, prompt=prompt)
    for d in [*oracles(base, len(prompt), seed=5).values(), RandomDrafter(model, 2, tree=True)]:
        tokens, steps = run(model, spec, d, prompt=prompt)
        assert tokens == base
        assert sum(s.drafted for s in steps) > 0


@pytest.fixture(scope="module")
def model(tiny_llama_q4):
    return tiny_llama_q4


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("actqkv:kernel=0", "kernel"),
        ("actqkv:kernel=64", "kernel"),
        ("actqkv:window=0", "window"),
        ("actqkv:every=-1", "every"),
        ("actqkv:budget=1.5", "budget"),
        ("actqkv:budget=x", "budget"),
        ("actqkv:mass=0.9", "unknown option"),
    ],
)
def test_bad_options_are_one_line_errors(spec, needle):
    with pytest.raises(SkipjackError) as e:
        make_policy(spec)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg


def test_cli_labels_it_lossy(capsys, tiny_folder):
    from skipjack.cli import main

    argv = ["generate", "--model", str(tiny_folder), "--no-tune", "-n", "6", "--json"]
    code = main([*argv, "--kv", "actqkv:budget=0.5", "hello world"])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["lossless"] is False and res["kv"] == "actqkv:budget=0.5" and "lossy" in err
    code = main([*argv, "--kv", "actqkv:kernel=0", "hello world"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "kernel" in err[0]


@pytest.mark.real
def test_real_model_budget_one_is_the_full_cache_and_a_tenth_shrinks_it():
    """SmolLM2-135M, a 600-token prompt: budget 1 gives the full cache's tokens; budget 0.1 holds about a
    tenth of its keys."""
    from skipjack.engine import Engine, Request
    from skipjack.loading.load import DEFAULT_MODEL

    e = Engine.load(DEFAULT_MODEL, "q4", tune=False)
    rng = random.Random(0)
    words = "the grass is green the sky is blue here we go there and back again".split()
    text = " ".join(rng.choice(words) for _ in range(500)) + " The pass key is 4417. What is the pass key?"
    ids = e.tokenizer.prompt_ids(text)
    params = SamplingParams(max_new_tokens=12)
    full = e.complete(Request(ids, params, "plain"))
    one = e.complete(Request(ids, params, "plain", kv="actqkv:budget=1.0"))
    tenth = e.complete(Request(ids, params, "plain", kv="actqkv:budget=0.1"))
    assert one.tokens == full.tokens and not one.lossless
    assert tenth.kv_bytes < 0.2 * full.kv_bytes
