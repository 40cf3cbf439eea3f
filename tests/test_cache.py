"""KV cache: rollback (`trim`) and tree compaction (`keep`) leave exactly the state of a fresh prefill."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_model, ours_from_hf
from hypothesis import given, settings
from hypothesis import strategies as st

from skipjack.cache import CachePolicy, FullKV, KVCache, LayerKV, SlidingLayerKV, TrackedCache, common_prefix
from skipjack.errors import SkipjackError


def _valid(layer):
    """(first position, keys, values) currently held by a layer cache."""
    first = getattr(layer, "first", 0)
    n = layer.offset - first
    return first, layer.k[:, :, :n].clone(), layer.v[:, :, :n].clone()


def assert_same_cache(a, b, atol=1e-5):
    assert a.offset == b.offset
    for la, lb in zip(a, b):
        fa, ka, va = _valid(la)
        fb, kb, vb = _valid(lb)
        lo = max(fa, fb)  # sliding caches may hold different amounts of history: compare what both hold
        torch.testing.assert_close(ka[:, :, lo - fa :], kb[:, :, lo - fb :], atol=atol, rtol=0)
        torch.testing.assert_close(va[:, :, lo - fa :], vb[:, :, lo - fb :], atol=atol, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_trim_then_continue_equals_fresh_prefill(family):
    m = ours_from_hf(hf_model(family, seed=7))
    ids = torch.randint(0, 96, (1, 30))
    cache = m.make_cache(64)
    m(ids[:, :20], cache)
    m(torch.randint(0, 96, (1, 7)), cache)  # a rejected draft
    cache.trim(7)
    out = m(ids[:, 20:], cache).logits
    fresh = m.make_cache(64)
    ref = m(ids, fresh).logits[:, 20:]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert_same_cache(cache, fresh)


def test_sliding_cache_bounded_and_exact_over_long_sequences():
    """Gemma 3 local layers keep at most window + 2*slack keys, yet decode matches a full forward."""
    hf = hf_model("gemma3_text", seed=8, max_position_embeddings=4096)
    m = ours_from_hf(hf)
    ids = torch.randint(0, 96, (1, 700))
    with torch.no_grad():
        ref = hf(ids).logits
    cache = m.make_cache(1024)
    sliding = [layer for layer in cache if isinstance(layer, SlidingLayerKV)]
    assert sliding, "gemma local layers should get sliding caches"
    outs = [m(ids[:, :400], cache).logits]
    for t in range(400, 700, 60):  # chunks with rollbacks in between
        m(torch.randint(0, 96, (1, 5)), cache)
        cache.trim(5)
        outs.append(m(ids[:, t : t + 60], cache).logits)
        assert all(0 < layer.first and layer.offset - layer.first <= layer.capacity for layer in sliding)
    torch.testing.assert_close(torch.cat(outs, 1), ref, atol=1e-4, rtol=0)
    small = sum(layer.nbytes for layer in sliding)
    full = sum(layer.nbytes for layer in cache if not isinstance(layer, SlidingLayerKV))
    assert small < full * len(sliding)  # sliding layers hold less than a full layer each


def test_keep_compacts_tree_path():
    m = ours_from_hf(hf_model("llama", seed=9))
    prefix = torch.tensor([[3, 4, 5, 6]])
    cache = m.make_cache(32)
    m(prefix[:, :3], cache)
    # tree over root 6: nodes a(7) b(8, child of a) c(9, root child) -> accept path root, c
    from skipjack.decoding.verify import tree_mask

    ids = torch.tensor([[6, 7, 8, 9]])
    m(ids, cache, positions=torch.tensor([3, 4, 5, 4]), tree_mask=tree_mask([-1, 0, -1]))
    cache.keep(3, [0, 3])
    fresh = m.make_cache(32)
    m(torch.tensor([[3, 4, 5, 6, 9]]), fresh)
    assert_same_cache(cache, fresh)


@settings(max_examples=40, deadline=None)
@given(
    lens=st.lists(st.tuples(st.integers(1, 9), st.integers(0, 9)), min_size=1, max_size=6),
    seed=st.integers(0, 1000),
    family=st.sampled_from(["llama", "gemma"]),
)
def test_any_sequence_of_partial_acceptances_equals_fresh_prefill(tiny_llama64, sliding_gemma64, lens, seed, family):
    """Append n tokens then roll back r of them, repeatedly: the cache equals a prefill of what was kept.
    The Gemma case starts past its sliding layers' buffer, so they evict, shift and roll back over evictions."""
    m = tiny_llama64 if family == "llama" else sliding_gemma64
    g = torch.Generator().manual_seed(seed)
    cache = m.make_cache(128 if family == "llama" else 400)
    kept: list[int] = [1, 2] if family == "llama" else torch.randint(0, 48, (280,), generator=g).tolist()
    m(torch.tensor([kept]), cache)
    assert family == "llama" or any(getattr(layer, "first", 0) > 0 for layer in cache)
    for n, r in lens:
        new = torch.randint(0, 48, (n,), generator=g).tolist()
        m(torch.tensor([new]), cache)
        r = min(r, n)
        cache.trim(r)
        kept += new[: n - r]
    fresh = m.make_cache(128 if family == "llama" else 400)
    m(torch.tensor([kept]), fresh)
    assert_same_cache(cache, fresh, atol=1e-10)


def test_cache_interface_and_errors():
    kv = LayerKV(1, 2, 4, capacity=8, dtype=torch.float32)
    kv.update(torch.ones(1, 2, 5, 4), torch.ones(1, 2, 5, 4), 0)
    assert kv.offset == 5 and kv.nbytes == 2 * 5 * 2 * 4 * 4
    assert kv.trim(2) == 2 and kv.offset == 3
    with pytest.raises(SkipjackError):
        kv.update(torch.ones(1, 2, 6, 4), torch.ones(1, 2, 6, 4), 3)  # past capacity


def test_policy_hooks_have_defaults():
    """`CachePolicy` declares every hook the decode loop calls: a policy that only makes layers compresses
    nothing, bounds no step and runs the prompt in one pass; a cache made without a policy keeps every key."""

    class Only(CachePolicy):
        def layer(self, spec):
            return FullKV().layer(spec)

    cache = KVCache([LayerKV(1, 2, 4, 16, torch.float32)], 16, Only())
    cache.settle()
    assert cache.room() == 16 and cache.policy.prompt_chunk() == 0 and not cache.policy.lossless
    assert not Only.plain_only and not Only.holds_every_key
    assert isinstance(KVCache([], 4).policy, FullKV) and FullKV.lossless and FullKV.holds_every_key


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_scratch_leaves_the_cache_bit_for_bit(family):
    """Draft writes in `scratch()` are forgotten on exit; with `lo`, the keys a scratch pass overwrote at
    [lo, offset) are put back too, even when the pass raises."""
    m = ours_from_hf(hf_model(family, seed=7))
    cache = m.make_cache(64)
    m(torch.randint(0, 96, (1, 20)), cache)
    before = [(layer.offset, layer.k.clone(), layer.v.clone()) for layer in cache]
    with cache.scratch():
        m(torch.randint(0, 96, (1, 5)), cache)  # a draft after the offset
        assert cache.offset == 25
    with pytest.raises(RuntimeError), cache.scratch(15):
        m(torch.randint(0, 96, (1, 5)), cache, positions=torch.arange(15, 20))  # rewrites held positions
        raise RuntimeError("a draft that fails half way")
    for layer, (offset, k, v) in zip(cache, before):
        assert layer.offset == offset
        assert torch.equal(layer.k[:, :, :offset], k[:, :, :offset])
        assert torch.equal(layer.v[:, :, :offset], v[:, :, :offset])


@settings(max_examples=30, deadline=None)
@given(steps=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=1, max_size=6))
def test_tracked_cache_keeps_the_common_prefix(tiny_llama64, steps):
    """Brought to any sequence of token lists, a `TrackedCache` holds each list's keys, equal to a fresh
    prefill of it; it keeps the common prefix and runs only the rest."""
    m = tiny_llama64
    held = TrackedCache()
    for tokens in steps:
        held.fit(len(tokens), lambda need: m.make_cache(max(4, need)))  # small, so it grows
        expect = common_prefix(held.tokens, tokens) if held.cache is not None else 0
        missing = held.sync(tokens)
        assert missing == tokens[expect:] and len(held) == expect and held.cache.offset == expect
        if missing:
            m(torch.tensor([missing]), held.cache, positions=torch.arange(expect, len(tokens)))
            held.extend(missing)
        fresh = m.make_cache(held.cache.capacity)
        m(torch.tensor([tokens]), fresh)
        assert held.tokens == tokens
        assert_same_cache(held.cache, fresh, atol=1e-10)
    ran = held.tokens[:2]
    after = TrackedCache.after(held.cache, ran)  # what a request leaves: cut to the tokens both hold
    assert after.tokens == ran and after.cache.offset == len(ran)
