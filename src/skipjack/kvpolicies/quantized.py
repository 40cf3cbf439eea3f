"""KV storage in a smaller dtype: bf16 (half of fp32) or int8 with one absmax scale per head and position
(a quarter, plus the scales), as llama.cpp's `--cache-type-k/v q8_0` and KIVI-style per-token quantization.

Keys and values are rounded when written and widened back to the compute dtype for attention, so each token's
stored keys are the same whichever pass wrote them (speculation on top stays exact relative to this policy).
For a model that computes in bf16, bf16 storage is what the full cache does already; for fp32 and the 4-bit
formats (which compute in fp32) it rounds, so the policy is lossy there, and its quality is measured.
"""

from __future__ import annotations

import torch

from skipjack.cache import CachePolicy, FullKV, LayerKV, LayerSpec
from skipjack.errors import SkipjackError

DTYPES = ("bf16", "int8")


class QuantLayerKV(LayerKV):
    """A full-attention layer whose k, v [1, H_kv, C, D] are bf16, or int8 with scales [1, H_kv, C, 1]."""

    def __init__(self, spec: LayerSpec, dtype: str):
        store = torch.bfloat16 if dtype == "bf16" else torch.int8
        super().__init__(spec.batch, spec.heads, spec.head_dim, spec.capacity, store)
        self.compute = spec.dtype
        self.scales = None
        if dtype == "int8":  # per head and position, for k and v: [B, H_kv, C, 1] x2
            self.scales = tuple(torch.zeros(spec.batch, spec.heads, spec.capacity, 1) for _ in range(2))

    def _put(self, buf: torch.Tensor, x: torch.Tensor, which: int, start: int) -> None:
        end = start + x.shape[2]
        if self.scales is None:
            buf[:, :, start:end] = x
            return
        s = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-30) / 127  # [B, H_kv, T, 1]
        buf[:, :, start:end] = (x.float() / s).round().clamp(-127, 127).to(torch.int8)
        self.scales[which][:, :, start:end] = s

    def _get(self, buf: torch.Tensor, which: int, end: int) -> torch.Tensor:
        if self.scales is None:
            return buf[:, :, :end].to(self.compute)
        return (buf[:, :, :end].float() * self.scales[which][:, :, :end]).to(self.compute)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int):
        end = start + k.shape[2]
        if start > self.offset or end > self.capacity:
            raise SkipjackError(f"context length {end} exceeds the cache capacity {self.capacity}")
        self._put(self.k, k, 0, start)
        self._put(self.v, v, 1, start)
        self.offset = end
        return self._get(self.k, 0, end), self._get(self.v, 1, end), range(0, start)  # [B, H_kv, end, D] x2

    def keep(self, start: int, idx: list[int]) -> None:
        if self.scales is not None:
            src = torch.tensor(idx, dtype=torch.long) + start
            for s in self.scales:
                s[:, :, start : start + len(idx)] = s.index_select(2, src)
        super().keep(start, idx)

    def span(self, lo: int, hi: int) -> tuple:
        """The stored keys/values at [lo, hi) and, for int8, their scales: what `put_span` restores exactly."""
        k, v = super().span(lo, hi)
        if self.scales is None:
            return k, v
        return k, v, *(s[:, :, lo:hi].clone() for s in self.scales)

    def put_span(self, lo: int, saved: tuple) -> None:
        super().put_span(lo, saved)
        if self.scales is not None:
            for s, part in zip(self.scales, saved[2:]):
                s[:, :, lo : lo + part.shape[2]] = part

    def moved(self, fresh: LayerKV) -> LayerKV:
        if not isinstance(fresh, QuantLayerKV):
            raise SkipjackError("a quantized cache layer can only move into another")
        n = self.offset
        fresh.k[:, :, :n], fresh.v[:, :, :n], fresh.offset = self.k[:, :, :n], self.v[:, :, :n], n
        if self.scales is not None:
            for a, b in zip(fresh.scales, self.scales):
                a[:, :, :n] = b[:, :, :n]
        return fresh

    def stored(self):
        raise SkipjackError("a cache stored in bf16/int8 cannot be saved to a prompt file (use --kv full)")

    @property
    def nbytes(self) -> int:
        scales = 0 if self.scales is None else 2 * self.offset * self.scales[0][:, :, :1].numel() * 4
        return super().nbytes + scales


class KVDtype(CachePolicy):
    """`--kv bf16` / `--kv int8`: every full-attention layer stores its keys/values in that dtype (sliding-window
    layers, already small, keep the compute dtype). Every key stays, in place: a drafter may read and rewrite
    past positions (`span` / `put_span` keep the rounded values and their scales exactly)."""

    lossless = False
    holds_every_key = True

    def __init__(self, dtype: str):
        if dtype not in DTYPES:
            raise SkipjackError(f"KV storage dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
        self.dtype = dtype

    def layer(self, spec: LayerSpec) -> LayerKV:
        if spec.window is not None:
            return FullKV().layer(spec)
        return QuantLayerKV(spec, self.dtype)
