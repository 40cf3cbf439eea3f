"""`kangaroo`: self-speculation through a shallow sub-network and a trained adapter (Kangaroo, Liu et al. 2024,
"Kangaroo: Lossless Self-Speculative Decoding via Double Early Exiting").

Draft: the model's first `layers` layers (2-4), then the adapter: one attention block (pre-norm, RoPE, the
model's head counts, residual) and its own final norm, then the model's shared LM head (or FR-Spec's reduced
head: `vocab`; by default the reduced vocabulary the adapter was trained against, if any). One token at a
time from the pending token, until the top-1 probability falls below `threshold` (0.6, as the paper's second
early exit), the budget is spent, or one more node cannot pay.

The adapter is distilled on the model's own outputs (`skipjack train-adapter`, `skipjack.tools.distil`): its logits
are trained towards the full model's distribution after the same token. It keeps its own one-layer KV cache,
written for every token the draft runs (the pending token and the draft nodes) and rolled back with the
target's context (the longest common prefix is kept; tokens it never saw, such as the prompt, get their
shallow hidden states from a pass over layers 0..`layers`-1 whose keys are put back as they were).

Verification continues from the shallow layers' saved hidden states where the model is batch-invariant
(`layered.resumable`: q4/q8): the draft's keys in layers 0..`layers`-1 and its hidden state after them are bit
for bit what the verify pass computes, so the verify pass runs only the layers above (`Proposal.resume`) and
the shallow layers run once per token. Elsewhere the verify pass recomputes every layer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from skipjack import integrity, store, validate
from skipjack.cache import LayerKV
from skipjack.decoding.proposal import DraftContext, Proposal, Verdict, common_prefix
from skipjack.drafters.layered import Calibrated, DraftHead, SharesModels, draft, resumable
from skipjack.errors import SkipjackError
from skipjack.models import fingerprint
from skipjack.models.common import attention_mask
from skipjack.models.rowops import Rope, apply_rope, rms_norm

KIND = "kangaroo-adapter"
VERSION = "1"


class Adapter(nn.Module):
    """One attention block and a final norm over the hidden state after the model's first `layers` layers."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float, layers: int):
        super().__init__()
        self.shape = dict(hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, eps=eps, layers=layers)
        self.heads, self.kv_heads, self.head_dim, self.eps, self.layers = heads, kv_heads, head_dim, eps, layers
        self.norm1 = nn.Parameter(torch.ones(hidden))  # [D]
        self.norm2 = nn.Parameter(torch.ones(hidden))  # [D]: the draft's final norm (before the LM head)
        self.wqkv = nn.Linear(hidden, (heads + 2 * kv_heads) * head_dim, bias=False)
        self.wo = nn.Linear(heads * head_dim, hidden, bias=False)
        nn.init.normal_(self.wqkv.weight, std=hidden**-0.5)
        nn.init.zeros_(self.wo.weight)  # starts as the identity: an early exit after `layers` layers
        self.rope = Rope(head_dim, 10000.0, torch.float32)

    @classmethod
    def for_model(cls, model, layers: int) -> Adapter:
        c = model.config
        if not 1 <= layers < model.num_layers - 1:
            raise SkipjackError(
                f"kangaroo: layers must be in [1, {model.num_layers - 2}] for this model (got {layers})"
            )
        a = cls(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps, layers)
        with torch.no_grad():
            a.norm2.copy_(model.norm_weight.float())
        return a

    def forward(self, h: torch.Tensor, positions: torch.Tensor, kv: LayerKV | None = None) -> torch.Tensor:
        """h [B, T, D] at positions [T] -> [B, T, D] (before `norm2`). With `kv`, the new keys are written at
        positions[0].. and every earlier key there is attended to; without, the pass is causal over h alone."""
        B, T, _ = h.shape
        x = rms_norm(h, self.norm1, self.eps)
        qkv = self.wqkv(x).view(B, T, self.heads + 2 * self.kv_heads, self.head_dim)  # [B, T, H+2Hkv, Dh]
        qk = apply_rope(qkv[:, :, : self.heads + self.kv_heads], *self.rope(positions))  # [B, T, H+Hkv, Dh]
        q, k, v = qk[:, :, : self.heads], qk[:, :, self.heads :], qkv[:, :, self.heads + self.kv_heads :]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H(kv), T, Dh]
        mask, causal = None, kv is None
        if kv is not None:
            k, v, past = kv.update(k, v, int(positions[0]))  # [B, Hkv, P + T, Dh] x2
            mask = attention_mask(positions, past, None, None)  # [T, P + T] bool, or None (one token)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return h + self.wo(o.transpose(1, 2).reshape(B, T, -1))  # [B, T, D]


def identity(model) -> str:
    """The model an adapter belongs to, whatever its precision: its config, final norm and first embeddings
    (rounded, so q4, q8 and fp32 loads of one GGUF agree)."""
    return fingerprint(model, precision=False)


def default_path(model) -> Path:
    """Where `skipjack train-adapter` saves a model's adapter: beside the model cache."""
    return store.home() / "adapters" / f"kangaroo-{identity(model)[:20]}.safetensors"


def save(adapter: Adapter, model, path: Path, about: dict) -> None:
    """Write the adapter atomically, with what it was trained for in the file's metadata."""
    from safetensors.torch import save_file

    meta = {"kind": KIND, "version": VERSION, "model": identity(model), "shape": json.dumps(adapter.shape)}
    tensors = {k: v.detach().float().contiguous() for k, v in adapter.state_dict().items()}
    meta["digest"] = integrity.digest(tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta | {"about": json.dumps(about)})
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load(model, path: Path) -> tuple[Adapter, dict]:
    """The adapter saved at `path` for `model`, and what was recorded about its training; one-line errors for a
    missing, damaged or foreign file."""
    from safetensors import SafetensorError, safe_open

    retrain = "train one with `skipjack train-adapter --model M`"
    if not path.exists():
        raise SkipjackError(f"kangaroo: no adapter for this model at {path}; {retrain} (a few minutes)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("kind") != KIND:
            raise ValueError("not a kangaroo adapter")
        shape, about = json.loads(meta["shape"]), json.loads(meta.get("about", "{}"))
        if not isinstance(shape, dict) or not isinstance(about, dict):
            raise ValueError("malformed metadata")
        if meta.get("digest") != integrity.digest(tensors):
            raise ValueError("its tensors do not match their checksum")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise SkipjackError(f"kangaroo: {path} is damaged or not an adapter ({e}); {retrain}") from None
    if meta.get("model") != identity(model):
        trained = about.get("model_name", "another model")
        raise SkipjackError(f"kangaroo: {path} was trained for {trained}, not this model; {retrain}")
    try:
        dims = [v for k, v in shape.items() if k != "eps"]
        eps = shape.get("eps")
        if not all(type(v) is int and 0 < v <= 1 << 20 for v in dims) or not isinstance(eps, float) or eps <= 0:
            raise ValueError(f"shape {shape}")
        adapter = Adapter(**shape)
        adapter.load_state_dict(tensors)
    except (RuntimeError, TypeError, ValueError) as e:
        raise SkipjackError(
            f"kangaroo: {path} does not fit this model ({(str(e).splitlines() or [type(e).__name__])[0]}); {retrain}"
        ) from None
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise SkipjackError(f"kangaroo: {path} holds non-finite weights; {retrain}")
    return adapter.eval(), about


class Kangaroo(SharesModels):
    name = "kangaroo"
    lossless = True

    def __init__(self, threshold: float = 0.6, vocab: int = -1, adapter: str = "", shared: dict | None = None):
        if not 0.0 <= threshold < 1.0:
            raise SkipjackError(f"kangaroo: threshold must be in [0, 1) (got {threshold})")
        self.threshold, self.vocab = threshold, vocab
        self.file = validate.path("kangaroo: adapter", adapter) if adapter else None
        self.shared = shared if shared is not None else {}
        self.model, self.head, self.adapter, self.calib = None, None, None, Calibrated()
        self.kv: LayerKV | None = None
        self.held: list[int] = []  # the tokens whose adapter keys `kv` holds, by position
        target = self.shared.get("target")
        if target is not None:  # the engine's model: a missing or foreign adapter is an error before any request
            self._setup(target.model, [])

    def _setup(self, model, tokens: list[int]) -> None:
        self.adapter, self.about = load(model, self.file or default_path(model))
        self.model, self.layers = model, self.adapter.layers
        if self.layers >= model.num_layers - 1:
            raise SkipjackError(f"kangaroo: the adapter follows layer {self.layers - 1}, too deep for this model")
        norm = self.adapter.norm2.detach().to(model.dtype)
        vocab = self.about.get("vocab", 0) if self.vocab < 0 else self.vocab  # -1: the vocabulary it was trained on
        self.head = DraftHead(model, vocab, self.shared.get("token_counts"), tokens, norm=norm)
        self.adapter.to(torch.float32)
        per_layer = sum(lin.nbytes for lin in model.linears()[:-1]) / model.num_layers
        own = sum(p.numel() * 4 for p in self.adapter.parameters()) / per_layer
        head = (self.head.linear or model.lm_head).nbytes / per_layer
        self.cost_prior = (self.layers + own + head) / (model.num_layers + model.lm_head.nbytes / per_layer)

    def begin(self, prompt: list[int]) -> None:
        self.kv, self.held = None, []  # a new request: its own adapter cache

    def end(self) -> None:
        self.kv, self.held = None, []

    def _shallow(self, ctx: DraftContext, lo: int, ids: list[int]) -> torch.Tensor:
        """Hidden states [1, n, D] after the shallow layers for tokens `ids` at positions lo.., which the cache
        already holds (their keys in those layers are put back afterwards; from position 0, a throwaway cache)."""
        pos = torch.arange(lo, lo + len(ids))
        run = dict(positions=pos, layers=range(self.layers), logits="none")
        if lo == 0:
            return self.model(torch.tensor([ids]), None, **run).last_hidden
        part = type(ctx.cache)(ctx.cache[: self.layers], ctx.cache.capacity)
        saved = part.span(lo, lo + len(ids))
        try:
            return self.model(torch.tensor([ids]), part, **run).last_hidden
        finally:
            part.put_span(lo, saved)

    def sync(self, ctx: DraftContext) -> None:
        """Bring the adapter cache to hold tokens[:-1] (keep the common prefix, compute the rest)."""
        tokens = ctx.tokens
        if self.kv is None or self.kv.capacity < ctx.cache.capacity:
            a = self.adapter
            fresh = LayerKV(1, a.kv_heads, a.head_dim, ctx.cache.capacity, torch.float32)
            self.kv = fresh if self.kv is None else self.kv.moved(fresh)
        keep = min(common_prefix(self.held, tokens), len(tokens) - 1)
        self.kv.trim(self.kv.offset - keep)
        del self.held[keep:]
        missing = tokens[keep:-1]
        if missing:
            h = self._shallow(ctx, keep, missing).float()  # [1, n, D]
            self.adapter(h, torch.arange(keep, keep + len(missing)), self.kv)
            self.held.extend(missing)

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> Proposal | None:
        if ctx.model is not self.model:
            self._setup(ctx.model, ctx.tokens)
        self.sync(ctx)
        shallow: list[torch.Tensor] = []
        resume = resumable(self.model)

        def run(token: int, pos: int) -> torch.Tensor:
            out = self.model(torch.tensor([[token]]), ctx.cache, positions=torch.tensor([pos]),
                             layers=range(self.layers), logits="none")  # fmt: skip
            shallow.append(out.last_hidden)  # [1, 1, D]
            self.held.append(token)
            return self.adapter(out.last_hidden.float(), torch.tensor([pos]), self.kv).to(self.model.dtype)

        # `hidden` asks the loop to run the last node too when the budget stops it: its shallow state resumes
        prop, raw = draft(ctx, run, self.head, self.threshold, self.calib, hidden=[] if resume else None)
        if prop is None:
            return None
        prop.state = raw
        if resume:
            prop.resume = (self.layers - 1, torch.cat(shallow[: len(prop) + 1], dim=1))  # [1, 1 + N, D]
        return prop

    def observe(self, proposal: Proposal, verdict: Verdict) -> None:
        self.calib.learn(proposal, verdict, proposal.state)

    def describe(self) -> dict:
        """The adapter in use, for reports."""
        return {"layers": getattr(self, "layers", None), "adapter": self.about if self.model is not None else None}
