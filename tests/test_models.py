"""Our model files against HF transformers on tiny random configs, and the layer-addressable interface."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, hf_model, ours_from_hf

ATOL = 1e-5


def pair(family: str, shape: tuple[int, int], seed: int = 0):
    """A tiny random HF model, ours converted from it, and random token ids of `shape`."""
    hf = hf_model(family, seed=seed)
    return hf, ours_from_hf(hf), torch.randint(0, hf.config.vocab_size, shape)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf_without_cache(family):
    hf, ours, ids = pair(family, (2, 23))
    with torch.no_grad():
        ref = hf(ids).logits
    torch.testing.assert_close(ours(ids).logits, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf_prefill_then_decode(family):
    """Prefill 9 tokens, then decode one at a time and in a chunk of 4: each step equals HF's full forward."""
    hf, ours, ids = pair(family, (1, 20), seed=3)
    with torch.no_grad():
        ref = hf(ids).logits  # [1, 20, V]
    cache = ours.make_cache(64)
    parts = [ours(ids[:, :9], cache).logits]
    for t in range(9, 16):
        parts.append(ours(ids[:, t : t + 1], cache).logits)
    parts.append(ours(ids[:, 16:], cache).logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), ref, atol=ATOL, rtol=0)
    assert cache.offset == 20


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_cached_decode_matches(family):
    """HF's own cached decode (its DynamicCache) agrees with our cached decode token by token."""
    hf, ours, ids = pair(family, (1, 12), seed=4)
    with torch.no_grad():
        out = hf(ids[:, :8], use_cache=True)
        past, hf_steps = out.past_key_values, [out.logits[:, -1]]
        for t in range(8, 12):
            out = hf(ids[:, t : t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            hf_steps.append(out.logits[:, -1])
    cache = ours.make_cache(32)
    mine = [ours(ids[:, :8], cache, logits="last").logits[:, -1]]
    for t in range(8, 12):
        mine.append(ours(ids[:, t : t + 1], cache).logits[:, -1])
    torch.testing.assert_close(torch.stack(mine), torch.stack(hf_steps), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_layer_subsets_compose(family):
    """Layers [0..l] then [l+1..L) on the same cache equal the full forward; exit-at-l equals head(hidden_l)."""
    hf = hf_model(family, num_hidden_layers=4)
    m = ours_from_hf(hf)
    ids = torch.randint(0, hf.config.vocab_size, (1, 10))
    full = m(ids).logits
    L = m.num_layers
    for ell in range(L - 1):
        cache = m.make_cache(16)
        first = m(ids, cache, layers=range(ell + 1), exit_layer=ell, return_hidden=[ell])
        h = first.hidden[ell]
        torch.testing.assert_close(first.logits, m.head(h), atol=0, rtol=0)
        # continue from h through the remaining layers
        rest = _run_layers_from(m, h, cache, range(ell + 1, L))
        torch.testing.assert_close(m.head(rest), full, atol=ATOL, rtol=0)


def _run_layers_from(m, h, cache, layers):
    """Run the remaining layers from a hidden state (what a self-speculative verifier does)."""
    positions = torch.arange(0, h.shape[1])
    return m(None, cache, hidden=h, positions=positions, layers=layers, logits="none").last_hidden


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_skip_sublayers(family):
    """Skipping a layer's attention or FFN equals running a model whose sub-layer output is zero."""
    hf = hf_model(family, num_hidden_layers=3)
    m = ours_from_hf(hf)
    ids = torch.randint(0, hf.config.vocab_size, (1, 7))
    base = m(ids).logits
    skip_attn = m(ids, skip_attn=[1]).logits
    skip_ffn = m(ids, skip_ffn=[1]).logits
    assert not torch.allclose(base, skip_attn) and not torch.allclose(base, skip_ffn)
    blk = m.layers[1]  # (for Gemma 3 the post-norm of a zero output is zero too, so the identity holds)
    with torch.no_grad():  # zero the output projections: the sub-layer then contributes nothing
        wo, wd = blk.wo, blk.wd
        blk.wo = type(wo)(torch.zeros(wo.out_features, wo.in_features))
        zero_attn = m(ids).logits
        blk.wo, blk.wd = wo, type(wd)(torch.zeros(wd.out_features, wd.in_features))
        zero_ffn = m(ids).logits
        blk.wd = wd
    torch.testing.assert_close(skip_ffn, zero_ffn, atol=ATOL, rtol=0)
    # skipping attention also skips the cache write; with zeroed wo the cache is written but unused
    torch.testing.assert_close(skip_attn, zero_attn, atol=ATOL, rtol=0)


def test_layer_subset_leaves_other_caches_untouched():
    m = ours_from_hf(hf_model("llama", num_hidden_layers=3))
    cache = m.make_cache(16)
    m(torch.tensor([[1, 2, 3]]), cache, layers=[0, 2])
    assert [layer.offset for layer in cache] == [3, 0, 3]


def test_tree_mask_forward_equals_separate_branches():
    """Two branches verified in one forward with a tree mask give each branch's own causal logits."""
    m = ours_from_hf(hf_model("llama", seed=5))
    prefix = torch.tensor([[5, 6, 7, 8]])
    a, b = [10, 11], [12, 13]
    ref = {}
    for name, br in (("a", a), ("b", b)):
        ref[name] = m(torch.cat([prefix, torch.tensor([br])], 1)).logits[0, -2:]
    cache = m.make_cache(32)
    m(prefix, cache)
    from skipjack.decoding.verify import tree_mask

    # nodes: a0 (root child), a1 (child of a0), b0 (root child), b1 (child of b0); root = pending token 8
    cache.trim(1)
    parents = [-1, 0, -1, 2]
    ids = torch.tensor([[8, a[0], a[1], b[0], b[1]]])
    pos = torch.tensor([3, 4, 5, 4, 5])
    out = m(ids, cache, positions=pos, tree_mask=tree_mask(parents)).logits[0]
    torch.testing.assert_close(out[1:3], ref["a"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[3:5], ref["b"], atol=ATOL, rtol=0)


def test_linear_pads_few_rows_without_changing_them():
    """A packed linear pads an input of m rows with zero rows to pad_to[m] rows (faster kernels); the real
    rows' outputs are those of the layer, and one row's output does not depend on the rows beside it."""
    from skipjack.weights.linear import PLAIN, DenseLinear, PackedLinear, packing_available

    torch.manual_seed(0)
    w, b = torch.randn(40, 24), torch.randn(40)
    packed = packing_available()
    lin = PackedLinear(w, b) if packed else DenseLinear(w, b)
    lin.pad_to = (0, 6, PLAIN, 3, 6, 6, 6, 9, 9)
    for m in range(1, 11):
        x = torch.randn(1, m, 24)
        y = lin(x)
        assert y.shape == (1, m, 40)
        torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    x = torch.randn(1, 4, 24)
    if packed:  # padded to the same kernel: bit for bit; PLAIN rows run F.linear on the plain layout
        assert torch.equal(lin(x)[:, :1], lin(x[:, :1]))
        assert torch.equal(lin(x[:, :2]), F.linear(x[:, :2], w, b))
        lin.plain = None  # a dropped plain copy falls back to the packed kernel, unpadded
        torch.testing.assert_close(lin(x[:, :2]), F.linear(x[:, :2], w, b), rtol=1e-5, atol=1e-5)


def test_padding_choice():
    """m rows run at the fastest measured row count >= m, only if it is MIN_GAIN faster than m itself."""
    from skipjack.decoding.tuning import choose
    from skipjack.weights.linear import PLAIN

    ms = {1: 26.0, 2: 30.0, 3: 26.0, 4: 21.0, 5: 20.0, 6: 20.5, 7: 24.0, 8: 24.5, 9: 23.0, 10: 25.0}
    assert choose(ms) == [0, 5, 5, 5, 5, 5, 6, 9, 9]  # 7 -> 9 is 4% faster; 9 and 10 pad nothing: trimmed
    assert choose({1: 1.0, 2: 0.99, 3: 1.5}) == [0]  # within MIN_GAIN: no padding at all
    assert choose({1: 2.0, 2: 1.0}) == [0, 2]
    # the plain layout wins where it beats the best packed choice (padded or not) by PLAIN_GAIN
    plain = {1: 18.0, 2: 18.9, 3: 19.5, 4: 30.0}
    assert choose(ms, plain) == [0, PLAIN, PLAIN, 5, 5, 5, 6, 9, 9]  # 3 rows: 19.5 is not 5% under 20.0
    assert choose({1: 2.0, 2: 3.0}, {1: 1.0}) == [0, PLAIN]


def test_padding_is_tuned_per_shape_and_cached(tmp_path, monkeypatch):
    """`tune_rows` measures every weight shape, applies its padding to each packed linear, caches it on disk
    (the next process reads it; a corrupt file is measured again), and the cost prior's cache key follows it."""
    from skipjack.decoding import tuning
    from skipjack.weights.linear import PLAIN, packing_available

    monkeypatch.setenv("SKIPJACK_HOME", str(tmp_path))
    calls = []
    real = tuning.time_rows
    monkeypatch.setattr(
        tuning, "time_rows", lambda lins, rows, **k: calls.append(1) or real(lins, rows, **(k | {"rounds": 1}))
    )
    model = ours_from_hf(hf_model("llama", seed=1, vocab=48))  # fp32: the dtype whose weights are packed
    tuned = tuning.tune_rows(model, remeasure=True)
    pads, groups = tuned.pads, tuning.linears_by_shape(model)
    if not packing_available():
        assert pads == {} and not groups  # no oneDNN on this machine: nothing is packed, nothing padded
        return
    assert len(groups) == 5  # q/k/v, o, gate/up, down, lm_head
    n = 2 * len(groups)  # each shape timed packed and in the plain layout
    assert set(pads) == {f"{i}x{o}" for i, o in groups} and len(calls) == n
    for (i, o), lins in groups.items():
        assert all(lin.pad_to == tuple(pads[f"{i}x{o}"]) for lin in lins)
        # the plain copy stays only where it is used
        assert all((lin.plain is not None) == (PLAIN in lin.pad_to) for lin in lins)
        assert sorted(tuned.ms[f"{i}x{o}"]) == list(range(1, tuning.MAX_ROWS + 1))
        assert sorted(tuned.plain_ms[f"{i}x{o}"]) == list(range(1, tuning.PLAIN_ROWS + 1))
    path = tuning.rows_path(model, groups)
    assert path.parent == tmp_path / "rows" and [p.name for p in path.parent.iterdir()] == [path.name]
    assert tuning.tune_rows(model).pads == pads and len(calls) == n  # read back, as a new process would
    for bad in ("{not json", '{"pads": {}, "ms": {}}', '{"pads": {"x": [1]}, "ms": {}, "plain_ms": {}}'):
        path.write_text(bad)
        tuning.tune_rows(model)
    assert len(calls) >= 4 * len(groups)  # measured again each time (plain only where the copies are still held)
    calls.clear()
    assert tuning.prior_path(model, {k: [0, 7] for k in pads}) != tuning.prior_path(model, pads)  # not reused
    bf16 = ours_from_hf(hf_model("llama", seed=3), torch.bfloat16)
    assert tuning.tune_rows(bf16).pads == {} and not calls  # bf16 pads nothing, measures nothing
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # and leaves no file behind
