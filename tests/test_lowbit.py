"""q4 / q8 weights: GGUF blocks read exactly, the kernels against a dequantised reference, and the
batch-invariant forward (a token's logits are bit-identical alone, in a verify chain or in a tree)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAMILIES, hf_model, ours_from_hf
from hypothesis import given, settings
from hypothesis import strategies as st

from skipjack.decoding.verify import tree_mask
from skipjack.errors import SkipjackError
from skipjack.weights import quant
from skipjack.weights.kernels import kernels
from skipjack.weights.linear import ConcatLinear, DenseLinear, QuantLinear, blocks, describe, fuse

# bytes per block, and the byte offsets of its fp16 fields (scales, mins)
BLOCKS = {
    "Q4_0": (32, 18, (0,)),
    "Q4_1": (32, 20, (0, 2)),
    "Q8_0": (32, 34, (0,)),
    "Q5_0": (32, 22, (0,)),
    "Q5_1": (32, 24, (0, 2)),
    "Q4_K": (256, 144, (0, 2)),
    "Q5_K": (256, 176, (0, 2)),
    "Q6_K": (256, 210, (208,)),
}


def random_blocks(t: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """n rows of k values of GGUF type t: random bytes, with every fp16 field a finite random scale."""
    per, size, halfs = BLOCKS[t]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n * k // per, size), dtype=np.uint8)
    for off in halfs:
        raw[:, off : off + 2] = (rng.standard_normal(len(raw)) * 0.01).astype(np.float16).view(np.uint8).reshape(-1, 2)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("t", sorted(BLOCKS))
def test_gguf_blocks_read_exactly(t):
    """Every block type we map reads to the very values `gguf`'s own dequantisation gives, bit for bit."""
    from gguf import GGMLQuantizationType, dequantize

    n, k = 6, 512
    raw = random_blocks(t, n, k)
    ref = dequantize(raw, GGMLQuantizationType[t]).reshape(n, k)
    w = quant.from_gguf(raw, t, n, k)
    assert w.kind == quant.EXACT[t] and w.shape == (n, k)
    assert np.array_equal(w.dequantize().numpy(), ref.astype(np.float32))


@pytest.mark.parametrize("t", ["Q4_0", "Q4_1"])
def test_four_bit_values_are_the_files_nibbles(t):
    per, size, halfs = BLOCKS[t]
    raw = random_blocks(t, 3, 64, seed=1)
    blocks_ = raw.reshape(-1, size)[:, size - 16 :]
    nibbles = np.concatenate([blocks_ & 15, blocks_ >> 4], axis=-1).reshape(3, 64)
    assert np.array_equal(quant.from_gguf(raw, t, 3, 64).values().numpy(), nibbles)


def activation_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The most the kernels' 8-bit activations can move y = x Wᵀ: each x_i moves at most half a step,
    amax(block of x_i) / 254, so |Δy_n| <= Σ_i |W_ni| amax_b(i) / 254 (plus fp32 rounding)."""
    amax = x.reshape(x.shape[0], -1, 32).abs().amax(-1).repeat_interleave(32, dim=1)  # [M, K]
    return (amax / 254) @ w.abs().T + 1e-4 * (x.abs() @ w.abs().T)  # [M, N]


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(["q4", "q8"]),
    m=st.integers(1, 2 * QuantLinear.WIDE + 8),
    k32=st.integers(1, 12),
    n=st.integers(1, 80),
    seed=st.integers(0, 1000),
    bias=st.booleans(),
)
def test_kernel_matches_dequantised_reference(kind, m, k32, n, seed, bias):
    """y = x Wᵀ (+ b) on the kernels is within the activation-rounding bound of the fp32 product with the
    dequantised weight, and one row's output never depends on the rows beside it, prompt-wide passes (in
    chunks of 64 rows) included."""
    g = torch.Generator().manual_seed(seed)
    k = 32 * k32
    w = torch.randn(n, k, generator=g) * 0.1
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 3
    b = torch.randn(n, generator=g) if bias else None
    lin = QuantLinear(quant.quantize(w, kind), b)
    wd = lin.weight().dequantize()
    ref = x @ wd.T + (0 if b is None else b)
    y = lin(x)
    assert torch.equal(kernels().unpack(lin.packed().args()), wd)
    assert ((y - ref).abs() <= activation_bound(x, wd)).all()
    assert torch.equal(lin(x[-1:]), y[-1:]) and torch.equal(lin(x[:1]), y[:1])


def test_q8_with_blocks_of_16_and_mins_match_reference():
    raw = random_blocks("Q6_K", 8, 256, seed=3)
    w6 = quant.from_gguf(raw, "Q6_K", 8, 256)
    w5 = quant.from_gguf(random_blocks("Q5_1", 8, 256, seed=4), "Q5_1", 8, 256)
    x = torch.randn(5, 256)
    for w in (w6, w5):
        lin = QuantLinear(w)
        assert ((lin(x) - x @ w.dequantize().T).abs() <= activation_bound(x, w.dequantize())).all()


def test_fused_blocks_keep_their_values():
    """Fusing q/k/v or gate/up never changes a value: q4 parts stay q4, q4 beside q8 is promoted exactly, and
    parts with no common format (blocks of 16 beside blocks with mins) run side by side."""
    a = quant.from_gguf(random_blocks("Q4_K", 4, 256), "Q4_K", 4, 256)
    b = quant.from_gguf(random_blocks("Q8_0", 2, 256), "Q8_0", 2, 256)
    c = quant.from_gguf(random_blocks("Q6_K", 3, 256), "Q6_K", 3, 256)
    for parts in ((a, b), (a, a), (b, c)):
        joined = fuse(*parts)
        assert torch.equal(joined.dequantize(), torch.cat([p.dequantize() for p in parts]))
    assert fuse(a, a).kind == "q4" and fuse(a, b).kind == "q8" and fuse(b, c).bs == 16
    split = blocks("q4")(fuse(a, c))  # Q4_K has mins, Q6_K blocks of 16: no common format
    assert isinstance(split, ConcatLinear)
    x = torch.randn(3, 256)
    assert torch.equal(split(x), torch.cat([QuantLinear(a)(x), QuantLinear(c)(x)], dim=-1))


def test_a_width_the_kernels_refuse_is_kept_dense_and_said():
    """q4 on a model whose widths are not multiples of 32: those linears stay fp32 (stated in the load line),
    and the model does not claim a batch-invariant forward."""
    m = ours_from_hf(hf_model("llama", hidden_size=40, num_attention_heads=4, num_key_value_heads=2), weights="q4")
    assert any(isinstance(x, DenseLinear) for x in m.linears())
    assert not m.invariant
    assert "input width not a multiple of 32" in describe(m.linears(), m.lm_head)


def one_by_one(m, prompt, tokens):
    cache = m.make_cache(64)
    m(torch.tensor([prompt]), cache)
    return torch.stack([m(torch.tensor([[t]]), cache).logits[0, -1] for t in tokens])  # [T, V]


@pytest.mark.parametrize("weights", ["q4", "q8"])
@pytest.mark.parametrize("family", FAMILIES)
def test_chain_and_tree_passes_are_bit_identical_to_single_tokens(family, weights):
    m = ours_from_hf(hf_model(family, seed=3), weights=weights)
    assert m.invariant
    prompt, chain = [1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17]
    single = one_by_one(m, prompt, chain)
    cache = m.make_cache(64)
    m(torch.tensor([prompt]), cache)
    assert torch.equal(m(torch.tensor([chain]), cache).logits[0], single)
    # a tree: root 8, branch a = 9, 10 (the chain's), branch b = 20, 21
    P = len(prompt)
    cache = m.make_cache(64)
    m(torch.tensor([prompt]), cache)
    ids, pos = [8, 9, 10, 20, 21], torch.tensor([P, P + 1, P + 2, P + 1, P + 2])
    tree = m(torch.tensor([ids]), cache, positions=pos, tree_mask=tree_mask([-1, 0, -1, 2])).logits[0]
    assert torch.equal(tree[:3], single[:3])
    assert torch.equal(tree[[0, 3, 4]], one_by_one(m, prompt, [8, 20, 21]))


def test_unknown_dtype_is_one_line():
    from skipjack.loading.load import resolve_dtype

    with pytest.raises(SkipjackError, match="unknown dtype 'q3'"):
        resolve_dtype(None, "q3")


@pytest.mark.parametrize("D", [32, 64, 96, 128])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_kernel_matches_sdpa(masked, D):
    """The invariant attention kernel against SDPA (GQA: 6 query heads on 2 KV heads), with a tree-like mask;
    head widths held in registers (64, 128), with a tail (96) and without (32)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 6, 5, D), torch.randn(1, 2, 43, D), torch.randn(1, 2, 43, D)
    mask = torch.rand(5, 43) > 0.3 if masked else None
    if mask is not None:
        mask[:, 0] = True
    o = kernels().attention(q.transpose(1, 2).contiguous(), k, v, mask, 0.2).transpose(1, 2)  # [B, H, T, D]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2, enable_gqa=True)
    torch.testing.assert_close(o, ref, atol=1e-5, rtol=1e-5)
