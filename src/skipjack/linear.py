"""Weights behind one small protocol: a linear layer y = x Wᵀ (+ b), whatever format W is stored in.

A weight format is a `Linear` subclass built from a dense weight [out, in] (and bias [out]); the loader picks
the format for a model (`default_format`), so another format (int4, int8) is one more class, not a branch.

- `DenseLinear`: `F.linear` on the plain [out, in] weight (BLAS).
- `PackedLinear`: the weight prepacked for oneDNN (fp32, bf16). oneDNN's blocked kernels run some row counts
  faster than others, and BLAS's matrix-vector kernel on the plain layout can beat them at one or two rows, so
  each row count m < len(pad_to) runs as tuning chose (`skipjack.tuning`): padded with zero rows to pad_to[m]
  rows (each output row depends only on its input row), or, where pad_to[m] is PLAIN, with `F.linear` on a
  plain copy of the weight. Untuned, neither is used; tuning drops the plain copy where no row count uses it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

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


FORMATS: dict[str, type[Linear]] = {"dense": DenseLinear, "packed": PackedLinear}


def default_format(dtype: torch.dtype) -> str:
    """Packed for oneDNN where it is available and takes the dtype; dense otherwise (fp64, no oneDNN)."""
    return "packed" if dtype in (torch.float32, torch.bfloat16) and packing_available(dtype) else "dense"
