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

from skipjack.cache import CachePolicy, FullKV, KVCache, LayerKV, LayerSpec
from skipjack.errors import SkipjackError
from skipjack.limits import MAX_DRAFT
from skipjack.models import native
from skipjack.models.rowops import KernelMath, TorchMath
from skipjack.weights.kernels import kernels
from skipjack.weights.linear import ConcatLinear, Embedding, Linear, QuantLinear, is_invariant, param


def attention_mask(q_pos: torch.Tensor, past, tree: torch.Tensor | None, window: int | None, sinks: int = 0):
    """Boolean mask [T, P + T] (True = attend) for queries at absolute positions q_pos [T].

    Keys are what the layer's cache returned: P past keys at absolute positions `past` (a range, or a
    LongTensor [P] for a layer that evicts), then the T new tokens' keys at q_pos. Past keys are visible to
    every query (within the window; keys at positions below `sinks` are visible whatever the window: attention
    sinks); among new tokens, `tree` [T, T] (ancestor-or-self) decides, or plain causality if it is None.
    Returns None when every key is visible (a plain one-token step), which lets SDPA take its fast path.
    """
    T, P = q_pos.shape[0], len(past)
    past_pos = torch.arange(past.start, past.stop) if isinstance(past, range) else past  # [P]
    oldest = int(past_pos[0]) if isinstance(past, range) and P else (int(past_pos.min()) if P else int(q_pos[0]))
    if tree is None and T == 1 and (window is None or q_pos[0] - oldest < window):
        return None
    new = torch.tril(torch.ones(T, T, dtype=torch.bool)) if tree is None else tree  # [T, T]
    mask = torch.cat([torch.ones(T, P, dtype=torch.bool), new], dim=1)  # [T, P + T]
    if window is not None:
        key_pos = torch.cat([past_pos, q_pos])  # [P + T]
        mask &= ((q_pos[:, None] - key_pos[None, :]) < window) | (key_pos[None, :] < sinks)
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


def kernel_attend(q, k, v, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, H_kv, S, D], mask bool [T, S] or None -> [B, H, T, D], by the C++ kernel: each
    query's softmax and weighted sum run over its visible keys in slot order with fixed-order sums, so a
    query's output does not depend on the other queries in the pass (`skipjack.weights.kernels`)."""
    o = kernels().attention(q.transpose(1, 2).contiguous(), k, v, mask, scale)  # [B, T, H, D]
    return o.transpose(1, 2)


def attend(q, k, v, mask, scale: float, causal: bool) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, H_kv, S, D] -> [B, H, T, D]. Grouped-query attention via SDPA.

    `mask` is None, or from `additive_mask`. Decode and verify steps (few queries) fold each KV head's G
    query heads into its query rows, so SDPA streams every cached key once rather than once per query
    head (less attention time at long contexts). Prefill keeps SDPA's causal
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
    trace: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> cosine
    # similarity [B, T] of each token's hidden state before and after its attention, and its FFN, sub-layer
    argmax: list[int] | None = None  # each logits row's argmax, where the native step computed it
    finite: bool | None = None  # whether every logit is finite, where the native step checked it (a batched
    # pass: all of the batch's)

    @classmethod
    def of(cls, p: native.Pass) -> ForwardOut:
        """A native pass's output (batch dim 1)."""
        lg = None if p.logits is None else p.logits[None]  # [1, R, V]
        return cls(lg, {i: t[None] for i, t in p.hidden.items()}, p.last[None], argmax=p.argmax, finite=p.finite)


class DecoderLM(nn.Module):
    """Base of every family: a stack of blocks with a layer-addressable forward.

    Subclasses set: `self.config`, `self.embedding` (an `Embedding`), `self.layers`, `self.norm_weight`,
    `self.lm_head` (a Linear), and `self.kinds` (per layer: (window or None, rope key)); and implement
    `embed(ids)` and `ropes(positions)`.

    `invariant` says whether the forward is batch-invariant: every linear is (the block formats), so the
    passes of up to MAX_DRAFT + 1 tokens attend with the invariant kernel too, and a token's logits are then
    bit-identical whether it runs alone, in a verify chain or in a tree.
    """

    kinds: list[tuple[int | None, str]]
    invariant: bool = False
    weights: str = "dense"  # the weight format's name (`skipjack.weights.linear.FORMATS`), set by `build_model`

    def _build(self, c, sd: dict[str, torch.Tensor], block_cls, linear, norm_shift: float = 0.0) -> None:
        """The parts every family shares: embeddings, blocks, final norm (+ shift), LM head (tied or not).
        `linear(weight, bias=None)` makes every linear layer (`skipjack.weights.linear`: the weight format)."""
        self.config = c
        self.embedding = Embedding(sd["model.embed_tokens.weight"])  # [V, Dm], dense or blocks
        self.layers = nn.ModuleList(block_cls(c, sd, f"model.layers.{i}.", linear) for i in range(c.num_hidden_layers))
        self.norm_weight = param(sd["model.norm.weight"] + norm_shift)
        head = sd.get("lm_head.weight")
        self.tied = c.tie_word_embeddings or head is None  # the LM head is the embedding table
        self.lm_head = linear(sd["model.embed_tokens.weight"] if self.tied else head)
        if self.tied and isinstance(self.lm_head, QuantLinear):  # one copy of the table: the head's tiles
            self.embedding.share(self.lm_head)
        self.invariant = is_invariant(self.linears())
        self.math = KernelMath if self.invariant and self.dtype == torch.float32 else TorchMath
        self.embedding.kernel = self.invariant
        for block in self.layers:
            block.math = self.math

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def ropes(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.dtype

    def linears(self) -> list[Linear]:
        """Every linear layer, in module order (the LM head last); a `ConcatLinear`'s parts are in it, not here."""
        inner = {id(p) for m in self.modules() if isinstance(m, ConcatLinear) for p in m.parts}
        return [m for m in self.modules() if isinstance(m, Linear) and id(m) not in inner]

    def head(self, h: torch.Tensor, lm_head: Linear | None = None, norm: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm + LM head (or `lm_head`, for example a reduced-vocabulary one; `norm`, a draft's own final
        norm weight): [B, T, D] -> logits [B, T, V] (fp32)."""
        h = self.math.rms_norm(h, self.norm_weight if norm is None else norm, self.config.rms_norm_eps)
        return self.softcap((lm_head or self.lm_head)(h).float())  # [B, T, V]

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if not cap else torch.tanh(logits / cap) * cap

    def make_cache(self, capacity: int | None = None, batch: int = 1, policy: CachePolicy | None = None) -> KVCache:
        """A cache for `capacity` positions (default: the model's context length), each layer's object made by
        `policy` (default: `FullKV`, every key kept)."""
        c = self.config
        capacity = capacity or c.max_position_embeddings
        if capacity > c.max_position_embeddings:
            raise SkipjackError(f"requested context {capacity} exceeds the model's {c.max_position_embeddings}")
        policy = policy or FullKV()
        spec = lambda i, w: LayerSpec(  # noqa: E731
            i, batch, c.num_key_value_heads, c.head_dim, capacity, w, self.dtype, self.num_layers
        )
        layers = [policy.layer(spec(i, window)) for i, (window, _) in enumerate(self.kinds)]
        return KVCache(layers, capacity, policy, self.layers[0].scale)

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor | None,  # [B, T]; None when `hidden` is given
        cache: KVCache | None = None,
        *,
        hidden: torch.Tensor | None = None,  # [B, T, D]: run the layers on this hidden state instead of embeddings
        positions: torch.Tensor | None = None,  # [T] absolute positions (default: cache.offset + arange(T));
        # the new keys are written from positions[0] on, in every layer that runs
        tree_mask: torch.Tensor | None = None,  # [T, T] bool, ancestor-or-self among the new tokens
        layers: Iterable[int] | None = None,  # which layers to run, in order (default: all)
        skip_attn: Iterable[int] = (),  # layers whose attention sub-layer is skipped
        skip_ffn: Iterable[int] = (),  # layers whose FFN sub-layer is skipped
        exit_layer: int | None = None,  # stop after this layer; norm + head are applied to its output
        return_hidden: Iterable[int] = (),  # layers whose output hidden state is returned
        logits: str | slice = "all",  # "all", "last", "none", or a slice over T
        trace: bool = False,  # run each layer's sub-layers as two calls and return their cosines (`ForwardOut.trace`)
    ) -> ForwardOut:
        B, T = (ids if hidden is None else hidden).shape[:2]
        if positions is None:
            start = cache.offset if cache is not None else 0
            positions = torch.arange(start, start + T)
        start = int(positions[0])
        if cache is None:  # a throwaway cache sized to this call
            cache = self.make_cache(capacity=int(positions.max()) + 1, batch=B)
        order = range(self.num_layers) if layers is None else list(layers)
        skip_attn, skip_ffn, want = set(skip_attn), set(skip_ffn), set(return_hidden)
        if not trace and native.fits(self, T, B, [cache]):  # the same pass in one C++ call
            h, seg = self.embed(ids) if hidden is None else hidden, [(cache, positions, tree_mask)]  # [1, T, D]
            run = (order, skip_attn, skip_ffn, exit_layer, want, logits)
            return ForwardOut.of(native.forward(self, h, seg, *run, owned=hidden is None))
        ropes = self.ropes(positions)
        masks: dict = {}
        out = ForwardOut(logits=None)
        h = self.embed(ids) if hidden is None else hidden  # [B, T, D]
        for i in order:
            window, rope_key = self.kinds[i]
            mask = lambda past, s=None, w=window: self._mask(masks, positions, past, tree_mask, s or (w, 0))  # noqa: E731
            run = lambda x, a, f, i=i, r=rope_key, m=mask: self.layers[i](x, cache[i], start, ropes[r], m, a, f)  # noqa: E731
            attn, ffn = i not in skip_attn, i not in skip_ffn
            if trace:
                mid = run(h, attn, False)  # [B, T, D]
                nxt = run(mid, False, ffn)  # [B, T, D]
                out.trace[i] = (F.cosine_similarity(h, mid, dim=-1), F.cosine_similarity(mid, nxt, dim=-1))
                h = nxt
            else:
                h = run(h, attn, ffn)
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

    @torch.inference_mode()
    def forward_batch(self, segments: list[Segment], return_hidden: Iterable[int] = ()) -> list[ForwardOut]:
        """Several sequences' new tokens in one pass (ragged batching): their rows are concatenated, so every
        linear streams its weights once for all of them, and each sequence's rows attend only to its own cache
        (`Ragged`). Where the forward is batch-invariant (q4/q8 kernels: each row computed alone, at most
        `MAX_DRAFT + 1` rows in all), each sequence's logits equal its own single pass bit for bit."""
        lens = [s.ids.shape[1] for s in segments]
        pos = [s.cache.offset + torch.arange(n) if s.positions is None else s.positions for s, n in zip(segments, lens)]
        if native.fits(self, sum(lens), 1, [s.cache for s in segments]):  # the same pass in one C++ call
            h = self.embed(torch.cat([s.ids for s in segments], 1))  # [1, ΣT, D]
            seg = [(s.cache, p, s.tree_mask) for s, p in zip(segments, pos)]
            every = range(self.num_layers)
            p = native.forward(self, h, seg, every, (), (), None, set(return_hidden), "all", owned=True)
            outs, o = [], 0
            for n in lens:
                taps = {i: t[None, o : o + n] for i, t in p.hidden.items()}
                amax = None if p.argmax is None else p.argmax[o : o + n]
                outs.append(ForwardOut(p.logits[None, o : o + n], taps, argmax=amax, finite=p.finite))
                o += n
            return outs
        ropes = self.ropes(torch.cat(pos))  # [ΣT] rows: RoPE is per row
        want, hidden = set(return_hidden), {}
        memos: list[dict] = [{} for _ in segments]
        h = self.embed(torch.cat([s.ids for s in segments], 1))  # [1, ΣT, D]
        for i in range(self.num_layers):
            window, rope_key = self.kinds[i]
            parts = [
                (
                    s.cache[i],
                    int(p[0]),
                    lambda past, sight=None, m=m, p=p, t=s.tree_mask, w=window: self._mask(
                        m, p, past, t, sight or (w, 0)
                    ),
                )
                for s, p, m in zip(segments, pos, memos)
            ]
            h = self.layers[i](h, Ragged(parts, lens), None, ropes[rope_key], None)  # [1, ΣT, D]
            if i in want:
                hidden[i] = h
        logits = self.head(h)  # [1, ΣT, V]
        outs, o = [], 0
        for n in lens:
            outs.append(ForwardOut(logits[:, o : o + n], {i: x[:, o : o + n] for i, x in hidden.items()}))
            o += n
        return outs

    def _mask(self, memo: dict, positions, past, tree, sight: tuple[int | None, int]):
        """A layer's attention: (how, mask, visible) with how/mask ("kernel", bool mask or None), ("causal",
        None) or ("sdpa", SDPA's additive float mask or None), and `visible` the bool mask [T, P + T] (None: all
        keys, or causal for a prefill from empty). `sight` = (window, sinks): the layer's attention window and
        its always-visible first positions (a cache policy's, else the model's window). Built once per forward
        for each (past positions, sight) and shared across layers; layers that evict return their own
        positions tensor, and those masks are not shared."""
        window, sinks = sight
        key = (past, window, sinks) if isinstance(past, range) else None
        if key is not None and key in memo:
            return memo[key]
        T = positions.shape[0]
        if self.invariant and T <= MAX_DRAFT + 1:  # a decoding or verify step: the invariant kernel
            m = attention_mask(positions, past, tree, window, sinks)  # bool [T, P + T] or None
            out = ("kernel", m, m)
        elif tree is None and len(past) == 0 and (window is None or T <= window):
            out = ("causal", None, None)  # a prefill from an empty cache: SDPA's causal kernel
        else:
            m = attention_mask(positions, past, tree, window, sinks)  # [T, P + T] or None
            G = self.config.num_attention_heads // self.config.num_key_value_heads
            out = ("sdpa", None if m is None else additive_mask(m, G, self.dtype), m)
        if key is not None:
            memo[key] = out
        return out


@dataclass
class Segment:
    """One sequence's part of a batched pass (`DecoderLM.forward_batch`)."""

    ids: torch.Tensor  # [1, T]
    cache: KVCache
    positions: torch.Tensor | None = None  # [T] (default: cache.offset + arange(T))
    tree_mask: torch.Tensor | None = None  # [T, T] bool


@dataclass
class Ragged:
    """A layer's caches in a batched pass: per sequence (its layer cache, first position, mask function), and
    how many of the concatenated rows are its."""

    parts: list[tuple]
    lens: list[int]


def run_attention(q, k, v, kv: LayerKV | Ragged, start: int, mask_fn, scale: float) -> torch.Tensor:
    """Append k/v [B, T, H_kv, D] to the layer cache and attend with q [B, T, H, D] -> [B, T, H*D]. With a
    `Ragged` cache, each sequence's rows go to its own cache and attend only to it."""
    if isinstance(kv, Ragged):
        outs, o = [], 0
        for (layer, first, mask), n in zip(kv.parts, kv.lens):
            outs.append(run_attention(q[:, o : o + n], k[:, o : o + n], v[:, o : o + n], layer, first, mask, scale))
            o += n
        return torch.cat(outs, 1)  # [1, ΣT, H*D]
    B, T = q.shape[:2]
    keys, vals, past = kv.update(k.transpose(1, 2), v.transpose(1, 2), start)  # [B, H_kv, S, D]; S = |past| + T
    assert keys.shape[2] == len(past) + T
    how, mask, visible = mask_fn(past, kv.sight)
    if kv.observes:  # a cache policy that scores keys by attention sees this pass's queries
        kv.observe(q, keys, visible, scale)
    if how == "kernel":
        o = kernel_attend(q.transpose(1, 2), keys, vals, mask, scale)  # [B, H, T, D]
    else:
        o = attend(q.transpose(1, 2), keys, vals, mask, scale, how == "causal")  # [B, H, T, D]
    return o.transpose(1, 2).reshape(B, T, -1)  # [B, T, H*D]


def config_from_dict(cls, d: dict):
    """A family config dataclass from a (normalised) HF config dict: unknown keys and None values ignored."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names and v is not None})
