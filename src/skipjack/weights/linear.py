"""Weights behind one small protocol: a linear layer y = x Wᵀ (+ b), whatever format W is stored in.

A weight format is a `Linear` subclass built from a dense weight [out, in] (and bias [out]); the loader picks
the format for a model (`default_format`), so another format (int4, int8) is one more class, not a branch.

- `DenseLinear`: `F.linear` on the plain [out, in] weight (BLAS).
- `QuantLinear`: 4- or 8-bit blocks (`weights.quant`) through skipjack's C++ kernels (`weights.kernels`),
  batch-invariant: a row's output is bit-identical whatever the other rows in the call.
- `ConcatLinear`: fused projections whose parts have no common block format, run side by side.
- `PackedLinear`: the weight prepacked for oneDNN (fp32, bf16). oneDNN's blocked kernels run some row counts
  faster than others, and BLAS's matrix-vector kernel on the plain layout can beat them at one or two rows, so
  each row count m < len(pad_to) runs as tuning chose (`skipjack.decoding.tuning`): padded with zero rows to pad_to[m]
  rows (each output row depends only on its input row), or, where pad_to[m] is PLAIN, with `F.linear` on a
  plain copy of the weight. Untuned, neither is used; tuning drops the plain copy where no row count uses it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from skipjack.errors import SkipjackError
from skipjack.limits import MAX_DRAFT
from skipjack.weights import quant
from skipjack.weights.quant import QuantTensor

PLAIN = -1  # PackedLinear.pad_to entry: multiply these rows by the plain-layout weight (F.linear)


def param(w: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(w, requires_grad=False)


class Linear(nn.Module):
    """The protocol: `forward(x [..., in]) -> [..., out]`, `in_features`, `out_features`, `nbytes`."""

    in_features: int
    out_features: int
    bias: nn.Parameter | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes a forward pass streams (the weight in its stored format, and the bias)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())


class DenseLinear(Linear):
    """`F.linear` on the weight in its plain [out, in] layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = param(weight.contiguous())  # [out, in]
        self.bias = None if bias is None else param(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class PackedLinear(Linear):
    """The weight prepacked for oneDNN, with the row padding or plain layout that tuning chose (module doc)."""

    pad_to: tuple[int, ...] = ()

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else param(bias)
        self.weight = param(torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 8))  # opaque layout
        self.plain = weight.contiguous()  # [out, in]; dropped by tuning where no row count uses it

    def forward(self, x: torch.Tensor, pad: int | None = None) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [M, in]
        m = rows.shape[0]
        if pad is None:
            pad = self.pad_to[m] if m < len(self.pad_to) else m
        if pad == PLAIN:
            if self.plain is not None:
                return F.linear(x, self.plain, self.bias)
            pad = m
        if m < pad and rows.dtype == torch.float32:  # each output row depends only on its input row
            rows = torch.cat([rows, rows.new_zeros(pad - m, self.in_features)])  # [pad, in]
        y = torch.ops.mkldnn._linear_pointwise(rows, self.weight, self.bias, "none", [], "")  # [max(m, pad), out]
        return y[:m].view(*x.shape[:-1], self.out_features)

    @property
    def nbytes(self) -> int:
        """The packed weight and bias (the plain copy, when kept, is a second copy for 1-2 row passes)."""
        held = self.weight.numel() * self.weight.element_size()
        return held + (0 if self.bias is None else self.bias.numel() * self.bias.element_size())


@functools.cache
def packing_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build's oneDNN packs and multiplies a weight of `dtype` correctly on this CPU (bf16
    packing needs AVX-512 or AVX-NE-CONVERT)."""
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 4, dtype=dtype), 8)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 4, dtype=dtype), w, None, "none", [], "")
        return torch.backends.mkldnn.is_available() and bool(torch.allclose(y.float(), torch.full((1, 4), 4.0)))
    except (RuntimeError, AttributeError):
        return False


class QuantLinear(Linear):
    """W in q4 or q8 blocks (`skipjack.weights.quant.QuantTensor`), held in the kernels' 8-row tiles at the file's own
    size (`quant.pack`: fp16 scales, or a k-quant's factors) and multiplied by the C++ kernels: each input row
    is quantised to 8 bits per block of 32 (as llama.cpp's Q8_1), block dot products are exact integer sums,
    the scales fp32, every reduction in a fixed order; so each output row is bit-identical whatever the number
    of rows in the call (`invariant`), prompts included (their rows go through in chunks of 64, which at 143
    rows of Qwen-1.5B's FFN took a third of an fp32 GEMM on a dequantised copy)."""

    WIDE = MAX_DRAFT + 1  # widest pass on the kernels: a verify step of MAX_DRAFT drafts + 1
    invariant = True

    def __init__(self, w: QuantTensor, bias: torch.Tensor | None = None):
        super().__init__()
        from skipjack.weights.kernels import hold, kernels

        self.out_features, self.in_features = w.shape
        self.kind, self.bs, self.source = w.kind, w.bs, w.source
        p = quant.pack(w)
        self.bits, self.mode = p.bits, p.mode
        for name in ("qs", "d", "m", "D", "Dmin"):  # [T, blocks, ...] tiles (`quant.Packed`), in huge pages
            t = getattr(p, name)
            setattr(self, name, None if t is None else param(hold(t)))
        self.bias = None if bias is None else param(bias.float())
        self.ops = kernels()
        self.args = self.packed().args()  # what the C++ side takes, built once (not per call)

    def packed(self) -> quant.Packed:
        n, k, tiles = self.out_features, self.in_features, (self.qs, self.d, self.m, self.D, self.Dmin)
        return quant.Packed(self.bits, self.mode, self.bs, *tiles, n, k, self.source)

    def weight(self) -> QuantTensor:
        """The weight as blocks, exactly (unpacked from the tiles)."""
        return self.packed().unpack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.args, self.bias)


class ConcatLinear(Linear):
    """Fused projections (q, k, v or gate, up) whose weights share no block format: each part is its own
    linear and the outputs are concatenated (what one fused matmul would give, row for row)."""

    def __init__(self, parts: list[Linear], bias: torch.Tensor | None = None):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features, self.out_features = parts[0].in_features, sum(p.out_features for p in parts)
        self.bias = None if bias is None else param(bias)
        self.invariant = all(getattr(p, "invariant", False) for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([p(x) for p in self.parts], dim=-1)  # [..., out]
        return y if self.bias is None else y + self.bias


class Embedding(nn.Module):
    """Token embeddings: rows of a table [V, D], dense or in blocks (a block table's rows are dequantised as
    they are looked up, exactly). The table is a plain attribute, not a parameter: a tied LM head holds the
    same tensors, and a pass reads only its tokens' rows, so it is no part of a pass's streamed bytes."""

    def __init__(self, table):
        super().__init__()
        self.table = table  # [V, D]: a tensor or a QuantTensor
        self.num_embeddings, self.embedding_dim = table.shape

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.table is None else self.table.dtype

    kernel = False  # dequantise block rows with the C++ kernel (set on a block model, whose kernels are built)
    shared: QuantLinear | None = None  # a tied LM head whose tiles hold the table (`share`)

    def share(self, head: QuantLinear) -> None:
        """Look rows up in a tied LM head's tiles (exactly the same values) and drop the table's own copy.
        The head stays the model's module, not this one's (it is held outside nn.Module's registry)."""
        object.__setattr__(self, "shared", head)
        self.table = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)  # [n]
        if self.shared is not None:
            rows = self.shared.ops.unpack_rows(self.shared.args, flat)  # [n, D]
            return rows.view(*ids.shape, self.embedding_dim)
        t = self.table
        if isinstance(t, QuantTensor):
            if self.kernel and t.d.dtype == torch.float32:  # the same values, without six torch ops per lookup
                from skipjack.weights.kernels import kernels

                rows = kernels().dequantize_rows(t.qs, t.d, t.m, t.kind == "q4", t.bs, flat)  # [n, D]
            else:
                rows = t.dequantize(flat)  # [n, D]
            return rows.view(*ids.shape, self.embedding_dim)  # [..., D]
        return F.embedding(ids, self.table)  # [..., D]


class Parts(list):
    """Weights to fuse along the output dim that have no common format (`fuse` returns it; the format's
    factory makes a `ConcatLinear` of it)."""


def fuse(*ws):
    """Concatenate projection weights along the output dim (one matmul instead of several): dense tensors
    with `torch.cat`, blocks with `quant.cat` (exact), a `Parts` list where blocks share no format."""
    if any(w is None for w in ws):
        return None
    if not any(isinstance(w, QuantTensor) for w in ws):
        return torch.cat(ws, dim=0)
    if all(isinstance(w, QuantTensor) for w in ws):
        joined = quant.cat(list(ws))
        if joined is not None:
            return joined
    return Parts(ws)


def rows(linear: Linear, ids: torch.Tensor) -> Linear:
    """A linear computing only output rows `ids` [n] of `linear`, in the same format (a reduced-vocabulary LM
    head: FR-Spec). Each kept row gives the bits the full linear gives it."""
    b = None if linear.bias is None else linear.bias[ids]
    if isinstance(linear, QuantLinear):
        return QuantLinear(linear.weight().rows(ids), b)
    dense = linear.weight if isinstance(linear, DenseLinear) else getattr(linear, "plain", None)
    if not isinstance(dense, torch.Tensor):
        raise SkipjackError(f"a reduced-vocabulary head needs the LM head's rows; {type(linear).__name__} keeps none")
    return DenseLinear(dense.detach()[ids], b)


def dense(linear: Linear) -> torch.Tensor:
    """The weight [out, in] of any format as a dense fp32 tensor (for training against it: a distilled draft's
    frozen LM head). Blocks are dequantised exactly; a packed weight without its plain copy is multiplied out."""
    if isinstance(linear, DenseLinear):
        return linear.weight.detach().float()
    if isinstance(linear, QuantLinear):
        return linear.weight().dequantize().float()
    if isinstance(linear, ConcatLinear):
        return torch.cat([dense(p) for p in linear.parts])
    if getattr(linear, "plain", None) is not None:
        return linear.plain.detach().float()
    eye = torch.eye(linear.in_features, dtype=torch.float32)  # [in, in]
    bias = 0.0 if linear.bias is None else linear.bias.float()
    return (linear(eye.to(param_dtype(linear))).float() - bias).T.contiguous()  # [out, in]


def param_dtype(linear: Linear) -> torch.dtype:
    return next((p.dtype for p in linear.parameters() if p.is_floating_point()), torch.float32)


def _dense(w) -> torch.Tensor:
    return w.dequantize() if isinstance(w, QuantTensor) else w


def blocks(kind: str):
    """The factory of format `kind` ("q4" or "q8"): GGUF blocks as they are (q4 blocks promoted exactly to q8
    for "q8"); a dense weight quantised (`quant.quantize`); a dense weight the kernels cannot take (an input
    width that is not a multiple of 32) kept dense in fp32, which `describe` reports."""

    def make(w, bias=None) -> Linear:
        if isinstance(w, Parts):  # dense beside blocks, or blocks with no common format
            joined = None
            if w[0].shape[1] % 32 == 0:
                joined = quant.cat([p if isinstance(p, QuantTensor) else quant.quantize(p, kind) for p in w])
            return make(joined, bias) if joined is not None else ConcatLinear([make(p) for p in w], bias)
        if isinstance(w, QuantTensor):
            return QuantLinear(w.to_q8() if kind == "q8" else w, bias)
        if w.shape[1] % 32:
            return DenseLinear(w.float(), None if bias is None else bias.float())
        return QuantLinear(quant.quantize(w, kind), bias)

    return make


def dense_factory(cls: type[Linear]):
    """A dense format's factory: blocks dequantised (exact fp32 values), parts concatenated."""

    def make(w, bias=None) -> Linear:
        if isinstance(w, Parts):
            w = torch.cat([_dense(p) for p in w])
        return cls(_dense(w), bias)

    return make


FORMATS = {
    "dense": dense_factory(DenseLinear),
    "packed": dense_factory(PackedLinear),
    "q4": blocks("q4"),
    "q8": blocks("q8"),
}


def describe(linears, head: Linear | None = None) -> str:
    """One line on how the weights are held: per kind, how many linears keep the file's blocks as stored and
    how many were quantised here or kept dense (and why), the LM head named apart."""
    from collections import Counter

    def kinds(m: Linear) -> list[str]:
        if isinstance(m, ConcatLinear):
            return [k for p in m.parts for k in kinds(p)]
        if isinstance(m, QuantLinear):
            how = m.source if m.source.startswith("requantised") else f"as stored ({m.source})"
            return [f"{m.kind} {how}"]
        if isinstance(m, DenseLinear) and m.weight.dtype == torch.float32 and m.in_features % 32:
            return ["fp32 dense (input width not a multiple of 32)"]
        return [str(getattr(m, "weight", None).dtype).removeprefix("torch.") + f" {type(m).__name__}"]

    body = Counter(k for m in linears if m is not head for k in kinds(m))
    parts = [f"{n} {k}" for k, n in body.most_common()]
    if head is not None:
        parts.append("LM head " + "+".join(kinds(head)))
    return "; ".join(parts)


def is_invariant(linears) -> bool:
    """Whether every linear gives each row the same bits whatever the rows beside it."""
    return all(getattr(m, "invariant", False) for m in linears)


def default_format(dtype: torch.dtype) -> str:
    """Packed for oneDNN where it is available and takes the dtype; dense otherwise (fp64, no oneDNN)."""
    return "packed" if dtype in (torch.float32, torch.bfloat16) and packing_available(dtype) else "dense"
