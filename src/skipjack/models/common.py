"""Pieces shared by every model family: RoPE, attention masks, attention, and the layer-addressable forward.

A family file (llama.py, gemma3.py) defines a config dataclass, a `Block` and a `DecoderLM` subclass with
`embed`, `head_norm` and per-layer attention kinds. The forward loop here gives every caller, per pass:
any subset of layers, attention-only / FFN-only skipping, early exit with norm + head on that layer, an
explicit tree mask over the new tokens, and the hidden states of chosen layers. Methods (self-speculation,
early exit, FFN skipping) are uses of this interface, never special cases in a family file.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from skipjack.cache import KVCache, LayerKV, SlidingLayerKV
from skipjack.errors import SkipjackError


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, cast back (HF Llama/Gemma numerics). `weight` already holds the scale."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype) if weight.dtype == x.dtype else (xf * weight.float()).to(x.dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype, scale: float = 1.0):
    """cos, sin [T, D] for rotate-half RoPE at the given absolute positions (linear scaling by `scale`)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))  # [D/2]
    ang = (positions.float()[:, None] / scale) * inv[None, :]  # [T, D/2]
    emb = torch.cat([ang, ang], dim=-1)  # [T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated by cos/sin [T, D] (rotate-half convention, as HF)."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # [B, T, H, D]
    return x * cos[:, None, :] + rot * sin[:, None, :]


def attention_mask(q_pos, start: int, k_first: int, n_keys: int, tree, window: int | None):
    """Boolean mask [T, S] (True = attend) for queries at absolute positions q_pos [T].

    Keys are the cache's valid slots: slots k_first..start-1 hold past positions (slot == position), slots
    start..start+T-1 hold the new tokens at positions q_pos. Past keys are visible to every query (within the
    window); among new tokens, `tree` [T, T] (ancestor-or-self) decides, or plain causality if it is None.
    Returns None when every key is visible (plain one-token decode), which lets SDPA take its fast path.
    """
    T = q_pos.shape[0]
    if tree is None and T == 1 and (window is None or q_pos[0] - k_first < window):
        return None
    n_past = start - k_first
    past_pos = torch.arange(k_first, start)  # [P]
    new = torch.tril(torch.ones(T, T, dtype=torch.bool)) if tree is None else tree  # [T, T]
    mask = torch.cat([torch.ones(T, n_past, dtype=torch.bool), new], dim=1)  # [T, S]
    if window is not None:
        key_pos = torch.cat([past_pos, q_pos])  # [S]
        mask &= (q_pos[:, None] - key_pos[None, :]) < window
    assert mask.shape[1] == n_keys
    return mask


def folds(G: int, T: int) -> bool:
    """Whether `attend` folds the G query heads of each KV head into rows (decode and verify steps)."""
    return G > 1 and T <= 16


def additive_mask(mask: torch.Tensor, G: int, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask [T, S] as SDPA's additive float mask, once per forward rather than per layer (SDPA
    converts a boolean mask on every call), with rows repeated for the G folded query heads where
    `attend` folds them: [G*T, S] or [T, S]."""
    m = torch.zeros(mask.shape, dtype=dtype).masked_fill_(~mask, float("-inf"))  # [T, S]
    return m.repeat(G, 1) if folds(G, mask.shape[0]) else m  # [G*T, S] or [T, S]


def attend(q, k, v, mask, scale: float, causal: bool) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, H_kv, S, D] -> [B, H, T, D]. Grouped-query attention via SDPA.

    `mask` is None, or from `additive_mask`. Decode and verify steps (few queries) fold each KV head's G
    query heads into its query rows, so SDPA streams every cached key once rather than once per query
    head (measured here: ~20% less attention time at a 4k-token context). Prefill keeps SDPA's causal
    GQA path."""
    B, H, T, D = q.shape
    G = H // k.shape[1]
    if causal or not folds(G, T):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True)
    qg = q.reshape(B, k.shape[1], G * T, D)  # [B, H_kv, G*T, D]: row g*T + t is head kv*G + g, query t
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale).view(B, H, T, D)


@dataclass
class ForwardOut:
    logits: torch.Tensor | None  # [B, T', V] for the requested positions
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # layer index -> [B, T, D] after that layer
    last_hidden: torch.Tensor | None = None  # [B, T, D] before the final norm


class DecoderLM(nn.Module):
    """Base of every family: a stack of blocks with a layer-addressable forward.

    Subclasses set: `self.config`, `self.embed_tokens`, `self.layers`, `self.norm_weight`, `self.lm_head` (a Linear),
    and `self.kinds` (per layer: (window or None, rope key)); and implement `embed(ids)` and `ropes(positions)`.
    """

    kinds: list[tuple[int | None, str]]

    def _build(self, c, sd: dict[str, torch.Tensor], block_cls, norm_shift: float = 0.0) -> None:
        """The parts every family shares: embeddings, blocks, final norm (+ shift), LM head (tied or not)."""
        self.config = c
        self.embed_tokens = param(sd["model.embed_tokens.weight"])  # [V, Dm]
        self.layers = nn.ModuleList(block_cls(c, sd, f"model.layers.{i}.") for i in range(c.num_hidden_layers))
        self.norm_weight = param(sd["model.norm.weight"] + norm_shift)
        head = sd.get("lm_head.weight")
        self.lm_head = Linear(sd["model.embed_tokens.weight"] if c.tie_word_embeddings or head is None else head)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def ropes(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: [B, T, D] -> logits [B, T, V] (fp32)."""
        h = rms_norm(h, self.norm_weight, self.config.rms_norm_eps)
        logits = self.lm_head(h).float()  # [B, T, V]
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if not cap else torch.tanh(logits / cap) * cap

    def make_cache(self, capacity: int | None = None, batch: int = 1) -> KVCache:
        """Preallocated cache for `capacity` positions (default: the model's context length)."""
        c = self.config
        capacity = capacity or c.max_position_embeddings
        if capacity > c.max_position_embeddings:
            raise SkipjackError(f"requested context {capacity} exceeds the model's {c.max_position_embeddings}")
        cache = KVCache(capacity=capacity)
        for window, _ in self.kinds:
            if window is not None and window + 256 < capacity:
                cache.append(SlidingLayerKV(batch, c.num_key_value_heads, c.head_dim, window, self.dtype))
            else:
                cache.append(LayerKV(batch, c.num_key_value_heads, c.head_dim, capacity, self.dtype))
        return cache

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,  # [B, T]
        cache: KVCache | None = None,
        *,
        positions: torch.Tensor | None = None,  # [T] absolute positions (default: cache.offset + arange(T))
        tree_mask: torch.Tensor | None = None,  # [T, T] bool, ancestor-or-self among the new tokens
        layers: Iterable[int] | None = None,  # which layers to run, in order (default: all)
        skip_attn: Iterable[int] = (),  # layers whose attention sub-layer is skipped
        skip_ffn: Iterable[int] = (),  # layers whose FFN sub-layer is skipped
        exit_layer: int | None = None,  # stop after this layer; norm + head are applied to its output
        return_hidden: Iterable[int] = (),  # layers whose output hidden state is returned
        logits: str | slice = "all",  # "all", "last", "none", or a slice over T
    ) -> ForwardOut:
        T = ids.shape[1]
        start = cache.offset if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T)
        if cache is None:  # a throwaway cache sized to this call
            cache = self.make_cache(capacity=int(positions.max()) + 1, batch=ids.shape[0])
        order = range(self.num_layers) if layers is None else list(layers)
        skip_attn, skip_ffn, want = set(skip_attn), set(skip_ffn), set(return_hidden)
        ropes = self.ropes(positions)
        masks: dict = {}
        out = ForwardOut(logits=None)
        h = self.embed(ids)  # [B, T, D]
        for i in order:
            window, rope_key = self.kinds[i]
            h = self.layers[i](
                h,
                cache[i],
                start,
                ropes[rope_key],
                lambda kf, n, w=window: self._mask(masks, positions, start, kf, n, tree_mask, w),
                attn=i not in skip_attn,
                ffn=i not in skip_ffn,
            )
            if i in want:
                out.hidden[i] = h
            if i == exit_layer:
                break
        out.last_hidden = h
        if logits == "none":
            return out
        sel = slice(-1, None) if logits == "last" else (slice(None) if logits == "all" else logits)
        out.logits = self.head(h[:, sel])
        return out

    def _mask(self, memo: dict, positions, start, k_first, n_keys, tree, window):
        """Masks are built once per forward for each (first key, #keys, window) and shared across layers."""
        key = (k_first, n_keys, window)
        if key not in memo:
            T = positions.shape[0]
            causal_prefill = tree is None and start == 0 and k_first == 0 and (window is None or T <= window)
            if causal_prefill:
                memo[key] = "causal"
            else:
                m = attention_mask(positions, start, k_first, n_keys, tree, window)  # [T, S] or None
                G = self.config.num_attention_heads // self.config.num_key_value_heads
                memo[key] = None if m is None else additive_mask(m, G, self.dtype)
        return memo[key]


def run_attention(q, k, v, kv: LayerKV, start: int, mask_fn, scale: float) -> torch.Tensor:
    """Append k/v [B, T, H_kv, D] to the layer cache and attend with q [B, T, H, D] -> [B, T, H*D]."""
    B, T = q.shape[:2]
    keys, vals, k_first = kv.update(k.transpose(1, 2), v.transpose(1, 2), start)  # [B, H_kv, S, D]
    mask = mask_fn(k_first, keys.shape[2])
    causal = isinstance(mask, str)
    o = attend(q.transpose(1, 2), keys, vals, None if causal else mask, scale, causal)  # [B, H, T, D]
    return o.transpose(1, 2).reshape(B, T, -1)  # [B, T, H*D]


PLAIN = -1  # Linear.pad_to entry: multiply these rows by the plain-layout weight (F.linear)


class Linear(nn.Module):
    """y = x Wᵀ (+ b) with the weight prepacked for oneDNN when available.

    On this CPU a prepacked fp32 weight streams faster than `F.linear` for a few tokens, and verifying a few
    tokens costs about the same as 1 (BENCHMARKS.md), which is what makes speculation pay on CPU. An input
    of m < len(pad_to) rows is padded with zero rows to pad_to[m] rows, the row count oneDNN's kernels run
    fastest at for this weight shape on this machine, or, where pad_to[m] is PLAIN, multiplied by the
    weight in its plain [out, in] layout with `F.linear` (BLAS's matrix-vector kernel streams one or two
    rows faster than oneDNN's blocked one here). `skipjack.padding` measures both and keeps the plain copy
    only where it is used; untuned, neither is used.
    """

    pad_to: tuple[int, ...] = ()

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else param(bias)
        self.packed = _PACK and weight.dtype in (torch.float32, torch.bfloat16)
        w = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 8) if self.packed else weight
        self.weight = param(w)  # [out, in] (opaque oneDNN layout when packed)
        self.plain = weight.contiguous() if self.packed else None  # [out, in]; dropped by tuning if unused

    def forward(self, x: torch.Tensor, pad: int | None = None) -> torch.Tensor:
        if not self.packed:
            return F.linear(x, self.weight, self.bias)
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


def _can_pack() -> bool:
    try:
        w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 4), 8)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 4), w, None, "none", [], "")
        return torch.backends.mkldnn.is_available() and bool(torch.allclose(y, torch.full((1, 4), 4.0)))
    except (RuntimeError, AttributeError):
        return False


_PACK = _can_pack()


def fuse(*ws: torch.Tensor | None) -> torch.Tensor | None:
    """Concatenate projection weights along the output dim (one matmul instead of several)."""
    return None if any(w is None for w in ws) else torch.cat(ws, dim=0)


def param(w: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(w, requires_grad=False)


def config_from_dict(cls, d: dict):
    """A family config dataclass from a (normalised) HF config dict: unknown keys and None values ignored."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names and v is not None})
