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
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from skipjack import integrity, store, validate
from skipjack.cache import KVCache, LayerKV, TrackedCache
from skipjack.decoding.proposal import DraftContext, Proposal, Verdict
from skipjack.drafters.base import Drafter, DraftSession, Resources
from skipjack.drafters.layered import Calibrated, DraftHead, draft, resumable
from skipjack.errors import SkipjackError, one_line
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
    with store.atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta | {"about": json.dumps(about)})


def expected_shape(model) -> dict:
    """The adapter dimensions that fit `model` (all but `eps` and `layers`)."""
    c = model.config
    return dict(hidden=c.hidden_size, heads=c.num_attention_heads, kv_heads=c.num_key_value_heads, head_dim=c.head_dim)


def _checked(model, shape: dict, about: dict, tensors: dict) -> None:
    """Raise ValueError (one line) unless the file's metadata and tensors describe an adapter for `model`: its
    dimensions, the layer it follows, its tensors' names, dtypes, shapes and values, and what it says about its
    training (the vocabulary it was trained against)."""
    want = expected_shape(model)
    if set(shape) != {*want, "eps", "layers"}:
        raise ValueError(f"its shape names {sorted(shape)}, not {sorted({*want, 'eps', 'layers'})}")
    for key, v in want.items():
        if shape[key] != v or type(shape[key]) is not int:
            raise ValueError(f"{key} {shape[key]!r}, not this model's {v}")
    eps, layers = shape["eps"], shape["layers"]
    if type(eps) is not float or not 0.0 < eps < 1.0:
        raise ValueError(f"eps {eps!r}")
    if type(layers) is not int or not 1 <= layers < model.num_layers - 1:
        raise ValueError(f"it follows layer {layers!r}, not one in [1, {model.num_layers - 2}] for this model")
    D, H, Hk, Dh = want["hidden"], want["heads"], want["kv_heads"], want["head_dim"]
    shapes = {"norm1": (D,), "norm2": (D,), "wqkv.weight": ((H + 2 * Hk) * Dh, D), "wo.weight": (D, H * Dh)}
    if set(tensors) != set(shapes):
        raise ValueError(f"its tensors are {sorted(tensors)}, not {sorted(shapes)}")
    for name, dims in shapes.items():
        t = tensors[name]
        if t.dtype != torch.float32 or tuple(t.shape) != dims:
            raise ValueError(f"{name} is {t.dtype} {tuple(t.shape)}, not float32 {dims}")
    vocab = about.get("vocab", 0)
    if type(vocab) is not int or vocab < 0:
        raise ValueError(f"it was trained against a vocabulary of {vocab!r} tokens")


def load(model, path: Path) -> tuple[Adapter, dict]:
    """The adapter saved at `path` for `model`, and what was recorded about its training; one-line errors for a
    missing, damaged or foreign file, or one that does not fit the model (every value read is checked)."""
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
        if meta.get("version") != VERSION:
            raise ValueError(f"adapter format {meta.get('version')!r}, not {VERSION!r}")
        shape, about = json.loads(meta["shape"]), json.loads(meta.get("about", "{}"))
        if not isinstance(shape, dict) or not isinstance(about, dict):
            raise ValueError("malformed metadata")
        if meta.get("digest") != integrity.digest(tensors):
            raise ValueError("its tensors do not match their checksum")
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        why = one_line(str(e) or type(e).__name__, 160)
        raise SkipjackError(f"kangaroo: {path} is damaged or not an adapter ({why}); {retrain}") from None
    if meta.get("model") != identity(model):
        trained = about.get("model_name")
        trained = one_line(trained, 80) if isinstance(trained, str) and trained.strip() else "another model"
        raise SkipjackError(f"kangaroo: {path} was trained for {trained}, not this model; {retrain}")
    try:
        _checked(model, shape, about, tensors)
        adapter = Adapter(**shape)
        adapter.load_state_dict(tensors)
    except (RuntimeError, TypeError, ValueError) as e:
        why = one_line((str(e).splitlines() or [type(e).__name__])[0], 200)
        raise SkipjackError(f"kangaroo: {path} does not fit this model ({why}); {retrain}") from None
    if not all(torch.isfinite(t).all() for t in tensors.values()):
        raise SkipjackError(f"kangaroo: {path} holds non-finite weights; {retrain}")
    return adapter.eval(), about


class Kangaroo(Drafter):
    """The options, the adapter and the draft head (`prepare`), and the calibration learned across requests;
    each request's adapter cache lives in its `KangarooSession`."""

    name = "kangaroo"
    lossless = True
    reads_past_keys = True  # its adapter pass runs the shallow layers over past positions of the target's cache
    owns_cache = True  # the adapter's one-layer cache
    LEARNED = ("calib",)

    def __init__(self, threshold: float = 0.6, vocab: int = -1, adapter: str = ""):
        if not 0.0 <= threshold < 1.0:
            raise SkipjackError(f"kangaroo: threshold must be in [0, 1) (got {threshold})")
        if vocab < -1:
            raise SkipjackError(
                f"kangaroo: vocab (draft head size; 0: full, -1: the adapter's) must be >= -1 (got {vocab})"
            )
        self.threshold, self.vocab = threshold, vocab
        self.file = validate.path("kangaroo: adapter", adapter) if adapter else None
        self.model = self.head = self.adapter = self.layers = None
        self.about: dict = {}
        self.prior = 0.0
        self.calib = Calibrated()

    def prepare(self, resources: Resources) -> None:
        """Load the adapter trained for the target model (`adapter`, else beside the model cache: a missing or
        foreign one is an error before any request) and make the draft head."""
        target = resources.target
        model = resources.model if resources.model is not None else target.model if target is not None else None
        if model is None:
            raise SkipjackError("kangaroo: drafts with the target model's shallow layers; none was given")
        adapter, about = load(model, self.file or default_path(model))
        norm = adapter.norm2.detach().to(model.dtype)
        vocab = about.get("vocab", 0) if self.vocab < 0 else self.vocab  # -1: the vocabulary it was trained on
        head = DraftHead(model, vocab, resources.token_counts, norm=norm)
        adapter.to(torch.float32)
        self.model, self.adapter, self.about, self.layers, self.head = model, adapter, about, adapter.layers, head
        per_layer = sum(lin.nbytes for lin in model.linears()[:-1]) / model.num_layers
        own = sum(p.numel() * 4 for p in adapter.parameters()) / per_layer
        width = (head.linear or model.lm_head).nbytes / per_layer
        self.prior = (self.layers + own + width) / (model.num_layers + model.lm_head.nbytes / per_layer)

    @property
    def cost_prior(self) -> float:
        return self.prior

    def session(self) -> KangarooSession:
        if self.model is None:
            raise SkipjackError("kangaroo: the drafter is not prepared (`prepare(resources)` loads the adapter)")
        return KangarooSession(self)

    def describe(self) -> dict:
        """The adapter in use, for reports."""
        return {"layers": self.layers, "adapter": self.about if self.model is not None else None}


class KangarooSession(DraftSession):
    """One request: the adapter's one-layer cache and the tokens whose keys it holds (`cache.TrackedCache`)."""

    def __init__(self, drafter: Kangaroo):
        self.drafter = drafter
        self.held = TrackedCache()

    def begin(self, prompt: list[int]) -> None:
        self.held = TrackedCache()  # a new request: its own adapter cache

    def end(self) -> None:
        self.held.clear()

    def _shallow(self, ctx: DraftContext, lo: int, ids: list[int]) -> torch.Tensor:
        """Hidden states [1, n, D] after the shallow layers for tokens `ids` at positions lo.., which the cache
        already holds (their keys in those layers are put back afterwards; from position 0, a throwaway cache)."""
        d = self.drafter
        pos = torch.arange(lo, lo + len(ids))
        run = dict(positions=pos, layers=range(d.layers), logits="none")
        if lo == 0:
            return d.model(torch.tensor([ids]), None, **run).last_hidden
        part = KVCache(ctx.cache[: d.layers], ctx.cache.capacity)
        with part.scratch(lo):
            return d.model(torch.tensor([ids]), part, **run).last_hidden

    def sync(self, ctx: DraftContext) -> None:
        """Bring the adapter cache to hold tokens[:-1] (keep the common prefix, compute the rest)."""
        a = self.drafter.adapter
        self.held.fit(ctx.cache.capacity, lambda n: LayerKV(1, a.kv_heads, a.head_dim, n, torch.float32))
        missing = self.held.sync(ctx.tokens[:-1])
        if missing:
            keep = len(self.held)
            h = self._shallow(ctx, keep, missing).float()  # [1, n, D]
            a(h, torch.arange(keep, keep + len(missing)), self.held.cache)
            self.held.extend(missing)

    @torch.inference_mode()
    def propose(self, ctx: DraftContext) -> Proposal | None:
        d, held = self.drafter, self.held
        if ctx.model is not d.model:
            raise SkipjackError("kangaroo: its adapter was prepared for another model than this request's")
        self.sync(ctx)
        shallow: list[torch.Tensor] = []
        resume = resumable(d.model)

        def run(token: int, pos: int) -> torch.Tensor:
            out = d.model(torch.tensor([[token]]), ctx.cache, positions=torch.tensor([pos]),
                          layers=range(d.layers), logits="none")  # fmt: skip
            shallow.append(out.last_hidden)  # [1, 1, D]
            held.extend([token])
            return d.adapter(out.last_hidden.float(), torch.tensor([pos]), held.cache).to(d.model.dtype)

        # `hidden` asks the loop to run the last node too when the budget stops it: its shallow state resumes
        prop, raw = draft(ctx, run, d.head, d.threshold, d.calib, hidden=[] if resume else None)
        if prop is None:
            return None
        prop.state = raw
        if resume:
            prop.resume = (d.layers - 1, torch.cat(shallow[: len(prop) + 1], dim=1))  # [1, 1 + N, D]
        return prop

    def observe(self, proposal: Proposal, verdict: Verdict) -> None:
        self.drafter.calib.learn(proposal, verdict, proposal.state)
