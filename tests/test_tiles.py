"""The kernels' weight layout (`quant.pack`: 8-row tiles at the GGUF file's own size) and where it lives:
every block type held exactly, at the bits per weight its format states; every type's matmul row-invariant
for 1 to 65 rows and within the activation-rounding bound; the portable and vector builds giving the same
bits; bad tiles refused in one line; weights in huge-page chunks; a tied table held once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import hf_model, ours_from_hf
from hypothesis import given, settings
from hypothesis import strategies as st
from test_lowbit import BLOCKS, activation_bound, random_blocks

from skipjack.weights import kernels as K
from skipjack.weights import quant
from skipjack.weights.kernels import kernels
from skipjack.weights.linear import QuantLinear

# bits per weight each type is held at: the file's own for Q4_1, Q4_K and Q8_0 (Q4_0 adds its implied min);
# 5- and 6-bit values as int8 beside the file's own scales (fp16, or a k-quant's factors)
HELD_BITS = {
    "Q4_0": 5.0,
    "Q4_1": 5.0,
    "Q8_0": 8.5,
    "Q5_0": 8.5,
    "Q5_1": 9.0,
    "Q4_K": 4.625,
    "Q5_K": 8.625,
    "Q6_K": 8.5625,
}


@pytest.mark.parametrize("t", sorted(BLOCKS))
def test_packed_tiles_hold_the_files_values_at_its_size(t):
    """Repacked into 8-row tiles (13 rows: the last tile padded), a weight keeps `gguf`'s own values bit for
    bit, unpacked whole, by rows, or back to blocks, and takes the bits per weight its format states."""
    from gguf import GGMLQuantizationType, dequantize

    n, k = 13, 512
    raw = random_blocks(t, n, k, seed=5)
    ref = torch.from_numpy(dequantize(raw, GGMLQuantizationType[t]).reshape(n, k).astype(np.float32))
    lin = QuantLinear(quant.from_gguf(raw, t, n, k))
    args = lin.packed().args()
    assert lin.mode == (quant.KS if t.endswith("_K") else quant.F16)
    assert torch.equal(kernels().unpack(args), ref)
    assert torch.equal(kernels().unpack_rows(args, torch.tensor([12, 0, 5])), ref[[12, 0, 5]])
    assert torch.equal(lin.weight().dequantize(), ref)
    assert lin.nbytes * 8 / (16 * k) == HELD_BITS[t]


@settings(max_examples=30, deadline=None)
@given(
    t=st.sampled_from(sorted(BLOCKS)),
    m=st.integers(1, QuantLinear.WIDE),
    n=st.integers(1, 40),
    seed=st.integers(0, 10**6),
    bias=st.booleans(),
)
def test_every_block_type_is_row_invariant_within_the_rounding_bound(t, m, n, seed, bias):
    """Each GGUF type on the tiles: up to 65 rows, every row's output is the bits it gets alone or in any
    prefix of the pass, and within the activation-rounding bound of the fp32 product."""
    k = 256 * (1 + seed % 2)
    g = torch.Generator().manual_seed(seed)
    w = quant.from_gguf(random_blocks(t, n, k, seed), t, n, k)
    b = torch.randn(n, generator=g) if bias else None
    lin = QuantLinear(w, b)
    x = torch.randn(m, k, generator=g)
    y = lin(x)
    wd = w.dequantize()
    assert ((y - (x @ wd.T + (0 if b is None else b))).abs() <= activation_bound(x, wd)).all()
    for i in {0, m // 2, m - 1}:
        assert torch.equal(lin(x[i : i + 1]), y[i : i + 1])
    cut = max(1, m // 3)
    assert torch.equal(lin(x[:cut]), y[:cut])


def test_the_portable_and_vector_builds_give_the_same_bits():
    """The plain C++ path (SKIPJACK_ISA=scalar: a CPU without AVX2) and the AVX2 path (SKIPJACK_ISA=avx2, built
    by flag where the CPU has more) give every block type's matmul the bits this machine's build gives."""
    native = kernels()
    builds = ["scalar"] + (["avx2"] if native.isa() not in ("avx2", "scalar") else [])
    for which in builds:
        other = kernels(which)
        assert other.isa() == which
        for t in sorted(BLOCKS):
            lin = QuantLinear(quant.from_gguf(random_blocks(t, 11, 512, seed=7), t, 11, 512), torch.randn(11))
            x = torch.randn(9, 512)
            args = lin.packed().args()
            for m in (1, 3, 4, 9):
                assert torch.equal(other.linear(x[:m], args, lin.bias), native.linear(x[:m], args, lin.bias))
            assert torch.equal(other.unpack(args), native.unpack(args))


def test_bad_tiles_are_one_line_errors():
    lin = QuantLinear(quant.from_gguf(random_blocks("Q4_K", 8, 256), "Q4_K", 8, 256))
    args = list(lin.packed().args())
    x = torch.randn(2, 256)
    for i, bad in [(3, args[3][:, :, :64]), (4, args[4].float()), (6, None), (8, 9), (1, 7)]:
        broken = list(args)
        broken[i] = bad
        with pytest.raises(RuntimeError, match="packed weight") as e:
            kernels().linear(x, tuple(broken), None)
        assert "\n" not in str(e.value).strip().splitlines()[0]
    with pytest.raises(RuntimeError, match="out of range"):
        kernels().unpack_rows(tuple(args), torch.tensor([8]))


def test_weights_are_held_in_huge_page_chunks(monkeypatch):
    """Streamed weights are copied into 2 MB-aligned chunks advised as huge pages; small tensors, and every
    tensor with SKIPJACK_HUGEPAGES=0, stay where they are."""
    big = torch.arange(1 << 18, dtype=torch.int32)  # 1 MB
    held = K.hold(big)
    assert torch.equal(held, big) and held.data_ptr() != big.data_ptr()
    assert held.untyped_storage().data_ptr() % (2 << 20) == 0 and held.data_ptr() % 64 == 0
    small = torch.ones(10)
    assert K.hold(small) is small
    monkeypatch.setenv(K.HUGEPAGES, "0")
    assert K.hold(big) is big


def test_a_tied_table_is_held_once_in_the_heads_tiles():
    """A tied embedding looks its rows up in the LM head's tiles (the same values) and keeps no copy."""
    m = ours_from_hf(hf_model("llama", tie_word_embeddings=True), weights="q8")
    assert m.tied and m.embedding.table is None and m.embedding.shared is m.lm_head
    assert m.lm_head not in list(m.embedding.modules())  # the model's module, not the embedding's
    ids = torch.tensor([[0, 5, 95, 5]])
    assert torch.equal(m.embedding(ids)[0], m.lm_head.weight().dequantize()[[0, 5, 95, 5]])
