"""The row-wise pieces of a layer: RMSNorm, gated activations, RoPE tables and rotation.

Two sets of row-wise ops: `TorchMath` (torch's, as HF computes them: dense fp32/bf16 models) and `KernelMath`
(the C++ functions the native step fuses, called one op at a time: block-format q4/q8 models), chosen per
model (`DecoderLM.math`). Each row is computed alone, so a token's bits do not depend on the other rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from skipjack.weights.kernels import kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, cast back (HF Llama/Gemma numerics). `weight` already holds the scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype) if weight.dtype == x.dtype else (xf * weight.float()).to(x.dtype)


class TorchMath:
    """The row-wise ops of a dense (fp32/bf16) model: torch's, as HF computes them."""

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    @staticmethod
    def act_mul(gu: torch.Tensor, gelu: bool) -> torch.Tensor:
        """act(g) * u for gu = [g | u] [..., 2F] -> [..., F] (SiLU, or GELU-tanh where `gelu`)."""
        g, u = gu.chunk(2, dim=-1)  # [..., F] x2
        return (F.gelu(g, approximate="tanh") if gelu else F.silu(g)) * u


class KernelMath:
    """The row-wise ops of a block-format (q4/q8) model: the C++ functions the native step fuses
    (`kernels/elementwise.h`), called here one op at a time. Each row is computed alone with fixed-order sums,
    so the Python forward and the native step give the same bits, whatever the rows in a pass."""

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return kernels().rms_norm(x, weight, eps)

    @staticmethod
    def act_mul(gu: torch.Tensor, gelu: bool) -> torch.Tensor:
        return kernels().act_mul(gu, gelu)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, scale: float = 1.0):
    """cos, sin [T, D] for rotate-half RoPE at the given absolute positions (linear scaling by `scale`)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))  # [D/2]
    ang = (positions.float()[:, None] / scale) * inv[None, :]  # [T, D/2]
    emb = torch.cat([ang, ang], dim=-1)  # [T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


class Rope:
    """RoPE tables by position, computed in fixed chunks of CHUNK positions and kept: a position's cos/sin
    are the same bits whichever positions share its pass (a batch-invariant forward needs that)."""

    CHUNK = 256

    def __init__(self, head_dim: int, theta: float, dtype: torch.dtype, scale: float = 1.0):
        self.args = (head_dim, theta, dtype, scale)
        self.chunks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _chunk(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        if c not in self.chunks:
            head_dim, theta, dtype, scale = self.args
            self.chunks[c] = rope_tables(
                torch.arange(c * self.CHUNK, (c + 1) * self.CHUNK), head_dim, theta, dtype, scale
            )
        return self.chunks[c]

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, D] at positions [T]."""
        if positions.shape[0] == 1:  # a plain step
            p = int(positions[0])
            cos, sin = self._chunk(p // self.CHUNK)
            return cos[p % self.CHUNK][None], sin[p % self.CHUNK][None]  # [1, D] x2
        lo, hi = (int(x) // self.CHUNK for x in positions.aminmax())
        parts = [self._chunk(c) for c in range(lo, hi + 1)]
        cos = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts])  # [n * CHUNK, D]
        sin = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts])
        idx = positions - lo * self.CHUNK  # [T]
        return cos[idx], sin[idx]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated by cos/sin [T, D] (rotate-half convention, as HF)."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # [B, T, H, D]
    return x * cos[:, None, :] + rot * sin[:, None, :]
