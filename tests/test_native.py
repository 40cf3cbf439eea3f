"""The native decoding step (`skipjack.models.native`, `kernels/layer.h`) gives the Python forward's bits.

Every comparison runs the same calls twice, with the native step off (`SKIPJACK_NATIVE=0`: the Python
reference, op by op) and on, from identically made caches, and asserts equal logits, hidden states and cache
contents, bit for bit: every family (llama, qwen2 with biases, gemma3 with sliding layers, sliding mistral and
qwen2), q4 and q8, 1 to 65 rows, chains and trees, skip sets, exit layers, hidden-state taps, resumes from a
hidden state and ragged batches; then the real default model on its quick prompts.
"""

from __future__ import annotations

import pytest
import torch
from conftest import hf_model, ours_from_hf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from skipjack.decoding.verify import tree_mask
from skipjack.kvpolicies import make_policy
from skipjack.models import native
from skipjack.models.common import Segment
from skipjack.weights.kernels import kernels

FAMS = ("llama", "qwen2", "gemma3_text", "mistral-sw", "qwen2-sw")
VOCAB = 48


native_step = native.switched


_MODELS: dict = {}


def model(fam: str, weights: str):
    if (fam, weights) not in _MODELS:
        hf = hf_model(fam, seed=3, vocab=VOCAB, num_hidden_layers=4, max_position_embeddings=1024)
        _MODELS[fam, weights] = ours_from_hf(hf, weights=weights)
    return _MODELS[fam, weights]


def both(fn):
    """fn() with the native step off, then on: (reference, native)."""
    with native_step(False):
        ref = fn()
    with native_step(True):
        nat = fn()
    return ref, nat


def assert_same(ref, nat):
    """Equal bits: tensors, and nested tuples/lists/dicts of them (caches compared by held keys)."""
    if isinstance(ref, torch.Tensor):
        assert ref.dtype == nat.dtype and ref.shape == nat.shape
        assert torch.equal(ref, nat), f"max diff {(ref.float() - nat.float()).abs().max().item()}"
    elif isinstance(ref, dict):
        assert ref.keys() == nat.keys()
        for k in ref:
            assert_same(ref[k], nat[k])
    elif isinstance(ref, (list, tuple)):
        assert len(ref) == len(nat)
        for a, b in zip(ref, nat):
            assert_same(a, b)
    else:
        assert ref == nat


def held(cache) -> list:
    return [(layer.offset, *layer.stored()[:2]) for layer in cache]


def random_tree(rng: torch.Generator, n: int) -> list[int]:
    return [int(torch.randint(-1, i, (1,), generator=rng)) if i else -1 for i in range(n)]


def test_every_family_takes_the_native_step():
    for fam in FAMS:
        for w in ("q4", "q8"):
            m = model(fam, w)
            assert native.reason(m) is None and native.native(m) is not None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fam=st.sampled_from(FAMS),
    weights=st.sampled_from(["q4", "q8"]),
    prefix=st.integers(1, 80),
    rows=st.integers(1, 65),
    tree=st.booleans(),
    seed=st.integers(0, 2**16),
    skips=st.lists(st.tuples(st.integers(0, 3), st.sampled_from(["attn", "ffn"])), max_size=3),
    exit_layer=st.none() | st.integers(0, 3),
    taps=st.sets(st.integers(0, 3), max_size=3),
    logits=st.sampled_from(["all", "last", "none"]),
)
def test_native_pass_equals_python(fam, weights, prefix, rows, tree, seed, skips, exit_layer, taps, logits):
    m = model(fam, weights)
    rng = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (1, prefix + rows), generator=rng)
    parents = random_tree(rng, rows - 1)
    mask = tree_mask(parents) if tree and rows > 1 else None
    depth = (mask.sum(-1) - 1) if mask is not None else torch.arange(rows)
    skip_attn = {i for i, k in skips if k == "attn"}
    skip_ffn = {i for i, k in skips if k == "ffn"}

    def run():
        cache = m.make_cache(prefix + rows + 4)
        m(ids[:, :prefix], cache, logits="none")  # a prompt of up to 65 rows is a native pass too
        out = m(
            ids[:, prefix:], cache, positions=prefix + depth, tree_mask=mask, skip_attn=skip_attn, skip_ffn=skip_ffn,
            exit_layer=exit_layer, return_hidden=taps, logits=logits,
        )  # fmt: skip
        return out.logits, out.hidden, out.last_hidden, held(cache)

    assert_same(*both(run))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fam=st.sampled_from(FAMS), rows=st.integers(1, 30), low=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_resume_from_a_hidden_state(fam, rows, low, seed):
    """A draft's exit state resumed over the upper layers (DEL, Kangaroo): the caller's hidden is not modified."""
    m = model(fam, "q4")
    ids = torch.randint(0, VOCAB, (1, 10 + rows), generator=torch.Generator().manual_seed(seed))

    def run():
        cache = m.make_cache(64)
        m(ids[:, :10], cache, logits="none")
        h = m(ids[:, 10:], cache, exit_layer=low, logits="none").last_hidden
        kept = h.clone()
        out = m(None, cache, hidden=h, positions=torch.arange(10, 10 + rows), layers=range(low + 1, m.num_layers))
        assert torch.equal(h, kept)
        return out.logits, h, held(cache)

    assert_same(*both(run))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fam=st.sampled_from(FAMS),
    lens=st.lists(st.integers(1, 20), min_size=1, max_size=4),
    prefixes=st.lists(st.integers(1, 40), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_ragged_batch_equals_python(fam, lens, prefixes, seed):
    m = model(fam, "q4")
    rng = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, VOCAB, (1, p + n), generator=rng) for p, n in zip(prefixes, lens)]

    def run():
        segs = []
        for s, p, n in zip(seqs, prefixes, lens):
            cache = m.make_cache(p + n + 2)
            m(s[:, :p], cache, logits="none")
            mask = tree_mask(random_tree(rng, n - 1)) if n > 2 else None
            pos = p + (mask.sum(-1) - 1 if mask is not None else torch.arange(n))
            segs.append(Segment(s[:, p:], cache, pos, mask))
        rng.manual_seed(seed)
        outs = m.forward_batch(segs, return_hidden=[1])
        return [(o.logits, o.hidden) for o in outs], [held(s.cache) for s in segs]

    rng.manual_seed(seed)
    ref = None
    with native_step(False):
        ref = run()
    with native_step(True):
        nat = run()
    assert_same(ref, nat)


def test_a_row_alone_equals_it_in_a_wide_pass():
    """Batch invariance through the native step: a token's logits are the same alone and in 65 rows."""
    m = model("qwen2", "q4")
    ids = torch.randint(0, VOCAB, (1, 70), generator=torch.Generator().manual_seed(1))
    cache = m.make_cache(80)
    m(ids[:, :5], cache, logits="none")
    wide = m(ids[:, 5:70], cache).logits  # [1, 65, V]
    for t in (64, 17, 0):  # from the end: the keys before each row stay the wide pass's
        cache.trim(cache.offset - 5 - t)
        alone = m(ids[:, 5 + t : 6 + t], cache).logits
        assert torch.equal(alone[0, 0], wide[0, t])


def test_the_native_step_is_not_taken_where_it_cannot_run():
    m = model("llama", "q4")
    cache = m.make_cache(200)
    assert native.fits(m, 65, 1, [cache])
    assert not native.fits(m, 66, 1, [cache])  # a prompt: Python's BLAS path
    assert not native.fits(m, 1, 2, [cache])
    evicting = m.make_cache(200, policy=make_policy("streaming"))
    assert not native.fits(m, 1, 1, [evicting])
    with native_step(False):
        assert native.reason(m) == "SKIPJACK_NATIVE=0" and not native.fits(m, 1, 1, [cache])
    dense = ours_from_hf(hf_model("llama", seed=3, vocab=VOCAB))
    assert native.reason(dense) == "its weights are not all in q4/q8 blocks"
    assert not native.fits(dense, 1, 1, [dense.make_cache(8)])


def test_bad_input_to_the_native_step_is_an_error_not_a_crash():
    m = model("llama", "q4")
    twin = native.native(m).run
    c = m.config
    cache = m.make_cache(8)
    kv = [t for layer in cache for t in (layer.k, layer.v)]
    slots = [0, 0] * c.num_hidden_layers
    ropes = [torch.zeros(1, c.head_dim)] * 2
    layers = list(range(c.num_hidden_layers))
    flags = [3] * len(layers)
    ok = dict(pos=torch.zeros(1, dtype=torch.long), rope=ropes, seg=[1], trees=[None], order=layers, flags=flags)
    bad = [
        dict(h=torch.zeros(1, c.hidden_size + 1)),  # wrong width
        dict(h=torch.zeros(66, c.hidden_size)),  # too many rows
        dict(h=torch.zeros(1, c.hidden_size, dtype=torch.float64)),
        dict(order=[99], flags=[3]),  # no such layer
        dict(slots=[8, 0] * c.num_hidden_layers),  # past the cache's end (8 slots)
        dict(kv=kv[:-2]),
        dict(trees=[torch.ones(2, 2, dtype=torch.bool)]),
        dict(head=[5]),
    ]
    for change in bad:
        args = {**ok, "h": torch.zeros(1, c.hidden_size), "kv": kv, "slots": slots, "taps": None, "head": [0]}
        args.update(change)
        with pytest.raises(RuntimeError, match="native step"):
            twin.forward(
                args["h"], args["pos"], args["rope"], args["seg"], args["trees"], args["order"], args["flags"],
                args["kv"], args["slots"], args["taps"], args["head"],
            )  # fmt: skip


def test_row_ops_match_their_definition():
    """The kernels' RMSNorm and gated activations against torch's, within float rounding."""
    x = torch.randn(7, 200) * 3
    w = torch.randn(200)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(kernels().rms_norm(x, w, 1e-6), ref, rtol=1e-5, atol=1e-5)
    gu = torch.randn(5, 2 * 77) * 6
    g, u = gu.chunk(2, -1)
    torch.testing.assert_close(kernels().act_mul(gu, False), torch.nn.functional.silu(g) * u, rtol=1e-5, atol=1e-5)
    gelu = torch.nn.functional.gelu(g, approximate="tanh") * u
    torch.testing.assert_close(kernels().act_mul(gu, True), gelu, rtol=1e-5, atol=1e-5)
    # rows are computed alone: a row's bits do not depend on the rows beside it
    assert torch.equal(kernels().rms_norm(x[3:4], w, 1e-6), kernels().rms_norm(x, w, 1e-6)[3:4])
    assert torch.equal(kernels().act_mul(gu[2:3], True), kernels().act_mul(gu, True)[2:3])


@pytest.mark.real
def test_real_default_model_native_equals_python():
    """The default model (SmolLM2-135M Q4_1 GGUF) on the quick prompts: greedy steps and a verify chain."""
    from skipjack.bench.suite import load_suite
    from skipjack.engine import Engine

    engine = Engine.load(None, tune=False)
    m, tok = engine.model, engine.loaded.tokenizer
    assert native.reason(m) is None
    for prompt in load_suite("quick")[:2]:
        ids = tok.prompt_ids(prompt.messages)[:300]

        def run(ids=ids):
            cache = m.make_cache(len(ids) + 40)
            m(torch.tensor([ids[:-1]]), cache, logits="none")
            out, toks = [], [ids[-1]]
            for _ in range(8):  # greedy steps
                lg = m(torch.tensor([toks[-1:]]), cache).logits
                out.append(lg)
                toks.append(int(lg[0, -1].argmax()))
            out.append(m(torch.tensor([toks[-6:]]), cache, positions=cache.offset + torch.arange(6)).logits)
            return out, held(cache)

        assert_same(*both(run))


@pytest.mark.parametrize("on", [False, True], ids=["python", "native"])
@pytest.mark.parametrize("drafter", ["always", "random-tree", "pld"])
def test_speculation_is_exact_on_both_paths(on, drafter):
    """The lossless identity on either path: speculative greedy output equals plain greedy output."""
    from drafters_mock import AlwaysAccept, RandomDrafter, decode

    from skipjack.decoding.sampling import SamplingParams

    m = model("qwen2", "q4")
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 9, 1, 2, 3] * 2
    with native_step(on):
        plain, _ = decode(m, prompt, SamplingParams(max_new_tokens=40), "plain")
        made = {"always": AlwaysAccept(m), "random-tree": RandomDrafter(m, 3, tree=True)}.get(drafter, drafter)
        spec, steps = decode(m, prompt, SamplingParams(max_new_tokens=40), made)
    assert spec == plain
    if drafter == "always":  # it drafted, and its drafts were taken
        assert len(steps) < len(plain)


def test_embedding_rows_from_the_kernel_equal_the_reference():
    from skipjack.weights.quant import quantize

    w = torch.randn(40, 64)
    ids = torch.tensor([0, 5, 39, 5])
    for kind in ("q4", "q8"):
        t = quantize(w, kind)
        got = kernels().dequantize_rows(t.qs, t.d, t.m, kind == "q4", t.bs, ids)
        assert torch.equal(got, t.dequantize(ids))
    with pytest.raises(RuntimeError, match="out of range"):
        kernels().dequantize_rows(t.qs, t.d, t.m, False, t.bs, torch.tensor([40]))


def test_the_step_cost_bench_on_a_tiny_model():
    """bench.stepcost: both paths' breakdowns (the native one from its C++ phase timers) and a c(k) curve."""
    from skipjack.bench.stepcost import breakdowns, curves, markdown

    m = model("llama", "q4")
    b = breakdowns(m)
    assert b["native"]["path"] == "native" and b["python"]["path"] == "python"
    assert set(b["native"]["phases_ms"]) >= {"matmuls", "attention", "LM head"}
    assert all(v >= 0 for v in b["native"]["phases_ms"].values())
    c = curves(m, None, contexts=(16,), ks=(1, 2, 4), repeats=2)
    assert c[16]["c_ours"][1] == 1.0 and all(v > 0 for v in c[16]["ours"].values())
    text = markdown({"model": "tiny", "dtype": "q4", "breakdown": b, "curves": c,
                     "machine": {"cpu": "x", "threads": 1, "date": "d"}})  # fmt: skip
    assert "| native |" in text and "context 16" in text and "llama.cpp" not in text.split("c(k):")[1]
