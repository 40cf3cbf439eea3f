"""Block-quantised weights as the kernels take them (`skipjack.weights.kernels`), read exactly from GGUF blocks.

Two formats, blocks along the input dimension K of a weight [N, K]:
- **q4**: 4-bit values q in 0..15, blocks of 32, w = d * q + m (fp32 d, m per block). GGUF's Q4_0
  (m = -8d), Q4_1 (d, m) and Q4_K (per-32 d = d_super * sc, m = -dmin * mn) map onto it without re-rounding
  anything: the 4-bit values are the file's, and the scales are exact products of its fp16 and 6-bit factors.
- **q8**: int8 values, blocks of 32 (or 16), w = d * q (+ m). GGUF's Q8_0, Q5_0, Q5_1, Q5_K and Q6_K (blocks
  of 16) map onto it exactly the same way (their 5- and 6-bit values fit in int8).

Any other tensor (F32, F16, BF16, other quant types) is quantised here (`quantize`): q4 as Q4_1 does (per-32
min and max), q8 as Q8_0 does (per-32 absolute max), with fp32 scales. That is a new rounding, and the loader
says so.

The k-quants keep their factors too (`KScales`: fp16 super-scales per 256 values and small integer scales per
block), so that `pack` can hold them at the file's own size. `pack` turns a weight into the kernels' layout
(`Packed`: 8-row tiles, scales in fp16 or as the file's factors; `kernels/matmul.h`), exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from skipjack.errors import SkipjackError

EXACT = {"Q4_0": "q4", "Q4_1": "q4", "Q4_K": "q4", "Q8_0": "q8", "Q5_0": "q8", "Q5_1": "q8", "Q5_K": "q8", "Q6_K": "q8"}


@dataclass
class KScales:
    """A k-quant's scales as the file holds them: d = D * sc per block of bs values, m = -(Dmin * mn) per
    block of 32 (both products exact in fp32)."""

    D: torch.Tensor  # fp16 [N, K/256]
    sc: torch.Tensor  # int8 [N, K/bs]
    Dmin: torch.Tensor | None  # fp16 [N, K/256], with mn
    mn: torch.Tensor | None  # int8 [N, K/32]

    def index(self, rows) -> KScales:
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return KScales(self.D[rows], self.sc[rows], pick(self.Dmin), pick(self.mn))


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
    k: KScales | None = None  # a k-quant's factors of d and m

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
        k = None if self.k is None else self.k.index(perm)
        return QuantTensor(self.kind, self.qs[perm], self.d[perm], m, self.bs, self.source, k)

    def to_q8(self) -> QuantTensor:
        """The same values as q8 (exact: 4-bit values fit in int8)."""
        if self.kind == "q8":
            return self
        return QuantTensor("q8", self.values().to(torch.int8), self.d, self.m, self.bs, self.source, self.k)

    def with_block(self, bs: int) -> QuantTensor:
        """The same q8 weight with blocks of `bs` (16 from 32 repeats each scale; exact)."""
        if bs == self.bs:
            return self
        if not (self.kind == "q8" and self.m is None and (self.bs, bs) == (32, 16)):
            raise ValueError("only offset-free q8 blocks of 32 split into blocks of 16")
        k = None if self.k is None else KScales(self.k.D, self.k.sc.repeat_interleave(2, dim=1), None, None)
        return QuantTensor("q8", self.qs, self.d.repeat_interleave(2, dim=1), None, 16, self.source, k)


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
    k = None  # the factors survive where every part has them in one layout
    if all(p.k is not None and p.bs == bs and (p.k.mn is None) == (p.m is None) for p in parts):
        join = lambda f: None if getattr(parts[0].k, f) is None else torch.cat([getattr(p.k, f) for p in parts])  # noqa: E731
        k = KScales(join("D"), join("sc"), join("Dmin"), join("mn"))
    return QuantTensor(kind, torch.cat([p.qs for p in parts]), torch.cat([p.d for p in parts]), m, bs, source, k)


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


# ---- the kernels' layout ----

F32, F16, KS = 0, 1, 2  # scale modes (kernels/matmul.h)
TILE = 8  # output rows per tile


@dataclass
class Packed:
    """A weight [N, K] in the kernels' layout (kernels/matmul.h): 8-row tiles (N padded with zero rows),
    the 8 rows' values for 4 inputs side by side; scales and mins per tile and block, fp32 (F32), fp16 (F16)
    or a k-quant's int8 factors of fp16 super-scales (KS)."""

    bits: int  # 4 | 8
    mode: int  # F32 | F16 | KS
    bs: int  # values per scale: 32, or 16
    qs: torch.Tensor  # 4-bit: uint8 [T, K/32, 128]; 8-bit: int8 [T, K/32, 256]
    d: torch.Tensor  # [T, K/bs, 8]: fp32 | fp16 | int8
    m: torch.Tensor | None  # [T, K/32, 8], same dtype as d
    D: torch.Tensor | None  # KS: fp16 [T, K/256, 8]
    Dmin: torch.Tensor | None  # KS with mins
    N: int
    K: int
    source: str

    def args(self) -> tuple:
        """What the C++ side takes (`qk.cpp`'s PW)."""
        return (self.bits, self.mode, self.bs, self.qs, self.d, self.m, self.D, self.Dmin, self.N, self.K)

    def unpack(self) -> QuantTensor:
        """The same weight as a QuantTensor, exactly (`pack`'s inverse)."""
        N, K, bits = self.N, self.K, self.bits
        q = _untile(self.qs.view(-1, K // 32, bits, TILE, 4).permute(0, 3, 1, 2, 4), N)  # [N, K*bits/8]
        k = None
        if self.mode == KS:
            rows = (None if t is None else _untile(t.transpose(1, 2), N) for t in (self.D, self.d, self.Dmin, self.m))
            k = KScales(*rows)
            d = k.D.float().repeat_interleave(256 // self.bs, dim=1) * k.sc.float()
            m = None if k.mn is None else -(k.Dmin.float().repeat_interleave(8, dim=1) * k.mn.float())
        else:
            d = _untile(self.d.transpose(1, 2), N).float()
            m = None if self.m is None else _untile(self.m.transpose(1, 2), N).float()
        return QuantTensor(f"q{bits}", q.reshape(N, -1), d, m, self.bs, self.source, k)


def _untile(t: torch.Tensor, N: int) -> torch.Tensor:
    """[T, 8, ...] -> [N, ...] (the padding rows dropped)."""
    return t.reshape(-1, *t.shape[2:])[:N].reshape(N, -1).contiguous()


def _tile(t: torch.Tensor) -> torch.Tensor:
    """Per-row [N, X] -> [T, X, 8], N padded with zero rows to a multiple of 8."""
    N = t.shape[0]
    pad = (-N) % TILE
    if pad:
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
    return t.reshape(-1, TILE, t.shape[1]).transpose(1, 2).contiguous()


def _fp16_exact(t: torch.Tensor | None) -> bool:
    return t is None or bool(torch.equal(t.half().float(), t))


def pack(w: QuantTensor) -> Packed:
    """`w` in the kernels' layout: a k-quant's own factors (KS), fp16 scales where every scale and min is one
    (F16: GGUF's Q4_0, Q4_1, Q8_0, Q5_0 and Q5_1), fp32 otherwise (our own quantisation)."""
    N, K = w.shape
    bits = 4 if w.kind == "q4" else 8
    per = K // 32
    qs = w.qs.reshape(N, per, bits, 4)  # [N, blocks, groups, 4 bytes]
    pad = (-N) % TILE
    if pad:
        qs = torch.cat([qs, qs.new_zeros(pad, *qs.shape[1:])])
    qs = qs.reshape(-1, TILE, per, bits, 4).permute(0, 2, 3, 1, 4).reshape(-1, per, 32 * bits).contiguous()
    if w.k is not None and K % 256 == 0:
        k = w.k
        D, Dmin = _tile(k.D), None if k.Dmin is None else _tile(k.Dmin)
        return Packed(bits, KS, w.bs, qs, _tile(k.sc), None if k.mn is None else _tile(k.mn), D, Dmin, N, K, w.source)
    mode, dt = (F16, torch.float16) if _fp16_exact(w.d) and _fp16_exact(w.m) else (F32, torch.float32)
    m = None if w.m is None else _tile(w.m.to(dt))
    return Packed(bits, mode, w.bs, qs, _tile(w.d.to(dt)), m, None, None, N, K, w.source)


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
        if w.k is not None:
            for f in ("D", "sc", "Dmin", "mn"):
                if getattr(w.k, f) is not None:
                    flat[f"{name}.k{f}"] = getattr(w.k, f).contiguous()
        index[name] = {"kind": w.kind, "bs": w.bs, "source": w.source, "k": w.k is not None}
    return flat, index


def unflatten(flat: dict[str, torch.Tensor], index: dict[str, dict]) -> dict:
    out = {k: v for k, v in flat.items() if k.rpartition(".")[0] not in index}
    for name, i in index.items():
        k = None
        if i.get("k"):
            k = KScales(*(flat.get(f"{name}.k{f}") for f in ("D", "sc", "Dmin", "mn")))
        out[name] = QuantTensor(
            i["kind"], flat[name + ".qs"], flat[name + ".d"], flat.get(name + ".m"), i["bs"], i["source"], k
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
        ks = _kscales(b[:, 0:2], sc, b[:, 2:4], mn, n)
        qs = b[:, -128:].reshape(-1, 4, 32)  # 4 chunks of 64 values: low nibbles, then high nibbles
        q = np.stack([qs & 15, qs >> 4], axis=2).reshape(-1, 256).astype(np.int16)
        if t == "Q5_K":
            qh = b[:, 16:48]  # bit j of qh[i] is the fifth bit of value 32 * j + i
            hb = np.stack([(qh >> j) & 1 for j in range(8)], axis=1).reshape(-1, 256)
            q = q | (hb.astype(np.int16) << 4)
            return _q8(q.astype(np.int8).reshape(n, k), d, m, 32, t, n, ks)
        return _q4(_pack4(q.reshape(n, k)), d, m, t, n, ks)
    if t == "Q6_K":
        b = blocks.reshape(-1, 210)
        ql, qh, scales, dd = b[:, :128], b[:, 128:192], b[:, 192:208].view(np.int8), _f16(b[:, 208:210])
        lo = np.stack([ql.reshape(-1, 2, 64) & 15, ql.reshape(-1, 2, 64) >> 4], axis=2)  # [nb, 2, 2, 64]
        hi = np.stack([(qh.reshape(-1, 2, 32) >> s) & 3 for s in (0, 2, 4, 6)], axis=2)  # [nb, 2, 4, 32]
        q = (lo.reshape(-1, 2, 4, 32) | (hi << 4)).astype(np.int16) - 32
        d = (dd * scales.astype(np.float32)).reshape(-1)
        ks = _kscales(b[:, 208:210], scales, None, None, n)
        return _q8(q.astype(np.int8).reshape(n, k), d, None, 16, t, n, ks)
    raise KeyError(t)


def _kscales(D, sc, Dmin, mn, n: int) -> KScales:
    """A k-quant's factors: D, Dmin the fp16 bytes [nb, 2] of each super-block, sc, mn its integer scales."""
    h = lambda a: torch.from_numpy(np.ascontiguousarray(a).view(np.float16).reshape(n, -1).copy())  # noqa: E731
    i8 = lambda a: torch.from_numpy(np.ascontiguousarray(a).astype(np.int8).reshape(n, -1))  # noqa: E731
    return KScales(h(D), i8(sc), None if Dmin is None else h(Dmin), None if mn is None else i8(mn))


def _q4(qs: np.ndarray, d: np.ndarray, m: np.ndarray, source: str, n: int, k: KScales | None = None) -> QuantTensor:
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(n, -1))  # noqa: E731
    return QuantTensor("q4", torch.from_numpy(np.ascontiguousarray(qs)), t(d), t(m), 32, source, k)


def _q8(qs, d, m, bs: int, source: str, n: int, k: KScales | None = None) -> QuantTensor:
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32).reshape(n, -1))  # noqa: E731
    qt = torch.from_numpy(np.ascontiguousarray(qs))
    return QuantTensor("q8", qt, t(d), None if m is None else t(m), bs, source, k)
