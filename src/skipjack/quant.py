"""Block-quantised weights as the kernels take them (`skipjack.kernels`), read exactly from GGUF blocks.

Two formats, blocks along the input dimension K of a weight [N, K]:
- **q4**: 4-bit values q in 0..15, blocks of 32, w = d * q + m (fp32 d, m per block). GGUF's Q4_0
  (m = -8d), Q4_1 (d, m) and Q4_K (per-32 d = d_super * sc, m = -dmin * mn) map onto it without re-rounding
  anything: the 4-bit values are the file's, and the scales are exact products of its fp16 and 6-bit factors.
- **q8**: int8 values, blocks of 32 (or 16), w = d * q (+ m). GGUF's Q8_0, Q5_0, Q5_1, Q5_K and Q6_K (blocks
  of 16) map onto it exactly the same way (their 5- and 6-bit values fit in int8).

Any other tensor (F32, F16, BF16, other quant types) is quantised here (`quantize`): q4 as Q4_1 does (per-32
min and max), q8 as Q8_0 does (per-32 absolute max). That is a new rounding, and the loader says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from skipjack.errors import SkipjackError

EXACT = {"Q4_0": "q4", "Q4_1": "q4", "Q4_K": "q4", "Q8_0": "q8", "Q5_0": "q8", "Q5_1": "q8", "Q5_K": "q8", "Q6_K": "q8"}


@dataclass
class QuantTensor:
    """A weight [N, K] in blocks: q4 (qs uint8 [N, K/2], two values a byte: element i of a block in the low
    nibble of byte i, element i+16 in the high one) or q8 (qs int8 [N, K]); d, m fp32 [N, K/bs]."""

    kind: str  # "q4" | "q8"
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None  # None: no offset (w = d * q)
    bs: int  # block size along K: 32, or 16 (q8 from Q6_K)
    source: str  # the GGUF type it came from, or "requantised from <dtype>"

    @property
    def shape(self) -> tuple[int, int]:
        n = self.qs.shape[0]
        return (n, self.qs.shape[1] * (2 if self.kind == "q4" else 1))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # what it computes in

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def to(self, dtype) -> QuantTensor:  # build_model casts every tensor; blocks keep their format
        return self

    def values(self, rows=None) -> torch.Tensor:
        """The integer values as int16 [n, K] (all rows, or the given ones)."""
        qs = self.qs if rows is None else self.qs[rows]
        if self.kind == "q8":
            return qs.to(torch.int16)
        n = qs.shape[0]
        b = qs.view(n, -1, 16)
        return torch.cat([b & 15, b >> 4], dim=-1).reshape(n, -1).to(torch.int16)

    def dequantize(self, rows=None) -> torch.Tensor:
        """fp32 [n, K]: d * q + m, elementwise in fp32 (all rows, or the given ones, e.g. token ids)."""
        q = self.values(rows).float()
        d = (self.d if rows is None else self.d[rows]).repeat_interleave(self.bs, dim=1)
        w = d * q
        if self.m is not None:
            w = w + (self.m if rows is None else self.m[rows]).repeat_interleave(self.bs, dim=1)
        return w

    def rows(self, perm: torch.Tensor) -> QuantTensor:
        """The same weight with its output rows reordered."""
        m = None if self.m is None else self.m[perm]
        return QuantTensor(self.kind, self.qs[perm], self.d[perm], m, self.bs, self.source)

    def to_q8(self) -> QuantTensor:
        """The same values as q8 (exact: 4-bit values fit in int8)."""
        if self.kind == "q8":
            return self
        return QuantTensor("q8", self.values().to(torch.int8), self.d, self.m, self.bs, self.source)

    def with_block(self, bs: int) -> QuantTensor:
        """The same q8 weight with blocks of `bs` (16 from 32 repeats each scale; exact)."""
        if bs == self.bs:
            return self
        if not (self.kind == "q8" and self.m is None and (self.bs, bs) == (32, 16)):
            raise ValueError("only offset-free q8 blocks of 32 split into blocks of 16")
        return QuantTensor("q8", self.qs, self.d.repeat_interleave(2, dim=1), None, 16, self.source)


def cat(parts: list[QuantTensor]) -> QuantTensor | None:
    """Stack weights along N in one format, without changing any value; None where no common format holds
    them all (a q8 with blocks of 16 beside one with offsets)."""
    if all(p.kind == "q4" for p in parts):
        return _stack(parts, "q4", 32)
    q8 = [p.to_q8() for p in parts]
    if any(p.m is not None for p in q8):
        if any(p.bs != 32 for p in q8):
            return None
        zero = [p if p.m is not None else QuantTensor("q8", p.qs, p.d, torch.zeros_like(p.d), 32, p.source) for p in q8]
        return _stack(zero, "q8", 32)
    bs = min(p.bs for p in q8)
    return _stack([p.with_block(bs) for p in q8], "q8", bs)


def _stack(parts: list[QuantTensor], kind: str, bs: int) -> QuantTensor:
    m = None if parts[0].m is None else torch.cat([p.m for p in parts])
    source = "+".join(dict.fromkeys(p.source for p in parts))
    return QuantTensor(kind, torch.cat([p.qs for p in parts]), torch.cat([p.d for p in parts]), m, bs, source)


def quantize(w: torch.Tensor, kind: str, source: str | None = None) -> QuantTensor:
    """Quantise a dense weight [N, K] (K a multiple of 32): q4 as Q4_1 (per-32 min/max), q8 as Q8_0."""
    N, K = w.shape
    if K % 32:
        raise SkipjackError(f"a {kind} weight needs an input width that is a multiple of 32 (got {K})")
    b = w.float().reshape(N, K // 32, 32)
    src = source or f"requantised from {str(w.dtype).removeprefix('torch.')}"
    if kind == "q8":
        d = b.abs().amax(-1) / 127  # [N, K/32]
        q = torch.where(d[..., None] > 0, b / d.clamp_min(1e-30)[..., None], 0).round().clamp(-127, 127)
        return QuantTensor("q8", q.to(torch.int8).reshape(N, K), d, None, 32, src)
    lo, hi = b.amin(-1), b.amax(-1)
    d = (hi - lo) / 15
    q = torch.where(d[..., None] > 0, (b - lo[..., None]) / d.clamp_min(1e-30)[..., None], 0).round().clamp(0, 15)
    q = q.to(torch.uint8)
    packed = (q[..., :16] | (q[..., 16:] << 4)).reshape(N, K // 2)
    return QuantTensor("q4", packed, d, lo, 32, src)


def flatten(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """A state dict with QuantTensors as plain tensors (`name.qs`, `name.d`, `name.m`) for safetensors, and
    the index that `unflatten` needs to put them back (name -> kind, block size, source)."""
    flat, index = {}, {}
    for name, w in state.items():
        if not isinstance(w, QuantTensor):
            flat[name] = w
            continue
        flat[name + ".qs"], flat[name + ".d"] = w.qs.contiguous(), w.d.contiguous()
        if w.m is not None:
            flat[name + ".m"] = w.m.contiguous()
        index[name] = {"kind": w.kind, "bs": w.bs, "source": w.source}
    return flat, index


def unflatten(flat: dict[str, torch.Tensor], index: dict[str, dict]) -> dict:
    out = {k: v for k, v in flat.items() if k.rpartition(".")[0] not in index}
    for name, i in index.items():
        out[name] = QuantTensor(
            i["kind"], flat[name + ".qs"], flat[name + ".d"], flat.get(name + ".m"), i["bs"], i["source"]
        )
    return out


# ---- GGUF blocks ----


def _f16(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.float16).astype(np.float32)


def _pack4(q: np.ndarray) -> np.ndarray:
    """Values 0..15 [N, K] -> the q4 byte layout [N, K/2]."""
    b = q.reshape(q.shape[0], -1, 32).astype(np.uint8)
    return (b[..., :16] | (b[..., 16:] << 4)).reshape(q.shape[0], -1)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: the 8 six-bit scales and mins of each super-block, from its 12 packed bytes."""
    s = scales.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _high_bits(qh: np.ndarray, n: int) -> np.ndarray:
    """Q5_0 / Q5_1: bit i of the little-endian u32 qh is element i's fifth bit."""
    bits = np.unpackbits(np.ascontiguousarray(qh).reshape(-1, 4), axis=-1, bitorder="little")
    return bits.reshape(n, 32)


def from_gguf(raw: np.ndarray, type_name: str, n: int, k: int) -> QuantTensor:
    """The weight [n, k] of a GGUF tensor of block type `type_name` (raw: its bytes), exactly (module doc)."""
    blocks = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    t = type_name
    if t in ("Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1"):
        size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q5_0": 22, "Q5_1": 24}[t]
        b = blocks.reshape(-1, size)
        d = _f16(b[:, 0:2]).reshape(-1)
        off = 4 if t in ("Q4_1", "Q5_1") else 2
        m = _f16(b[:, 2:4]).reshape(-1) if off == 4 else None
        if t == "Q8_0":
            return _q8(b[:, 2:].view(np.int8).reshape(n, k), d, None, 32, t, n)
        if t in ("Q5_0", "Q5_1"):
            ql = b[:, off + 4 :]
            lo = np.concatenate([ql & 15, ql >> 4], axis=-1)
            q = (lo | (_high_bits(b[:, off : off + 4], lo.shape[0]) << 4)).astype(np.int16)
            q = q - 16 if t == "Q5_0" else q
            return _q8(q.astype(np.int8).reshape(n, k), d, m, 32, t, n)
        qs = b[:, off:].reshape(n, k // 2)
        if t == "Q4_0":
            m = -8.0 * d  # exact: a power-of-two multiple of an fp16 value
        return _q4(qs, d, m, t, n)
    if t in ("Q4_K", "Q5_K"):
        size = 144 if t == "Q4_K" else 176
        b = blocks.reshape(-1, size)
        dd, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])  # [nb, 1]
        sc, mn = _k_scales(b[:, 4:16])  # [nb, 8]
        d, m = (dd * sc).reshape(-1), (-(dmin * mn)).reshape(-1)
        qs = b[:, -128:].reshape(-1, 4, 32)  # 4 chunks of 64 values: low nibbles, then high nibbles
        q = np.stack([qs & 15, qs >> 4], axis=2).reshape(-1, 256).astype(np.int16)
        if t == "Q5_K":
            qh = b[:, 16:48]  # bit j of qh[i] is the fifth bit of value 32 * j + i
            hb = np.stack([(qh >> j) & 1 for j in range(8)], axis=1).reshape(-1, 256)
            q = q | (hb.astype(np.int16) << 4)
            return _q8(q.astype(np.int8).reshape(n, k), d, m, 32, t, n)
        return _q4(_pack4(q.reshape(n, k)), d, m, t, n)
    if t == "Q6_K":
        b = blocks.reshape(-1, 210)
        ql, qh, scales, dd = b[:, :128], b[:, 128:192], b[:, 192:208].view(np.int8), _f16(b[:, 208:210])
        lo = np.stack([ql.reshape(-1, 2, 64) & 15, ql.reshape(-1, 2, 64) >> 4], axis=2)  # [nb, 2, 2, 64]
        hi = np.stack([(qh.reshape(-1, 2, 32) >> s) & 3 for s in (0, 2, 4, 6)], axis=2)  # [nb, 2, 4, 32]
        q = (lo.reshape(-1, 2, 4, 32) | (hi << 4)).astype(np.int16) - 32
        d = (dd * scales.astype(np.float32)).reshape(-1)
        return _q8(q.astype(np.int8).reshape(n, k), d, None, 16, t, n)
    raise KeyError(t)


def _q4(qs: np.ndarray, d: np.ndarray, m: np.ndarray, source: str, n: int) -> QuantTensor:
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(n, -1))  # noqa: E731
    return QuantTensor("q4", torch.from_numpy(np.ascontiguousarray(qs)), t(d), t(m), 32, source)


def _q8(qs: np.ndarray, d: np.ndarray, m: np.ndarray | None, bs: int, source: str, n: int) -> QuantTensor:
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(n, -1))  # noqa: E731
    return QuantTensor("q8", torch.from_numpy(np.ascontiguousarray(qs)), t(d), None if m is None else t(m), bs, source)
