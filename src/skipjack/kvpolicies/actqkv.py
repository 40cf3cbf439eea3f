"""ActQKV (Xiao et al. 2025, "Activation-aware Probe-Query: Effective Key-Value Retrieval for Long-Context
LLMs Inference", arXiv 2502.13542): one probe query per layer, built from the window's queries with the most
weight on the tokens whose activations stray furthest from the layer's usual ones, scores the keys; each layer's
share of the budget follows how spread that probe's scores are (the dynamic KV cut-off).

At each compression point (after the prompt; with `every`, during decoding too), per layer:
1. Activation Bias. mu_j, var_j: each query channel's mean and variance over every query this layer has seen
   (the prompt's and the accepted decoded ones; channels j over all heads, H x D). A window query q_t's bias
   is phi_t = mean_j (q_tj - mu_j)^2 / (var_j + mean(var) / 100).
2. Probe query. P = sum_t w_t q_t, w_t = phi_t / sum phi (one weight per window token, shared by the heads):
   the window's anchor tokens, those with outlier activations, weigh most.
3. Key scores. The probe's attention softmax(P . K / sqrt(D)) over the held keys, averaged over each KV head's
   query heads, average-pooled along positions (`kernel`) -> [H_kv, n]; per KV head the best keys and the
   window are kept (the kept keys move into smaller tensors, `EvictingLayerKV`).
4. Dynamic cut-off. A layer's information density: the normalised entropy eta = H(p) / log m of the probe's
   distribution p over its m candidate keys (those before the window, renormalised). Layer budgets are
   clamp(c . eta, LOW, HIGH x the mean) with c such that they sum to budget x context x layers: a layer whose
   probe spreads its attention keeps more keys, one whose probe focuses keeps fewer.

The paper's full text was not available offline (its abstract and third-party summaries were); the formulas
are read from the authors' code (github.com/MrXiaoaa/ActQKV, `context_manager_activate_3_dev.py`, built on
InfLLM): the running channel statistics, the bias (its `activate`: squared deviation over the variance plus a
hundredth of the mean variance), the token weights (the bias averaged over channels, normalised to sum 1),
the weighted-sum probe, the entropy of the softmaxed scores normalised by log n, and the per-layer bounds
(32 and 2 x 46 blocks around a mean of 46). What differs, and why:
- The reference retrieves InfLLM blocks of 32 keys from CPU memory at every step (a block scored by the
  probe's cosine with its representative key, from its 4 most attended keys) and drops nothing; here keys are
  scored one by one (pooled over neighbours, SnapKV's clustering, in place of blocks) and evicted, so memory
  falls.
- Its cut-off hands out a running budget over the layers in turn (a layer gets its mean eta over the last 100
  steps, over the remaining layers', of what is left); with every layer scored at once that is the
  proportional share above, clamped as the reference clamps.
- Its statistics are of un-rotated query projections, in module-level variables that every layer updates;
  here each layer keeps its own (a summary of the paper: the deviation from the mean "for the current
  transformer layer"), of the queries after RoPE, as the cache sees them (RoPE's slow channels, where outlier
  activations are reported to gather, turn little over a few thousand positions).
- Left out: its warm-up (uniform weights over the first windows: here the statistics already hold the whole
  prompt) and its question term (a second probe from question tokens extracted per task, `question_weight`:
  here the window is the end of the prompt, the question in the long-context tasks).
"""

from __future__ import annotations

import math

import torch

from skipjack import validate
from skipjack.cache import FullKV, LayerKV, LayerSpec
from skipjack.kvpolicies.base import SMALL, EvictingLayerKV, EvictionPolicy, pooled

LOW, HIGH = 32 / 46, 2.0  # a layer's budget within these multiples of the mean (the reference: 32, 2 x 46 blocks)


class ActLayerKV(EvictingLayerKV):
    """An evicting layer that also holds the running moments of its accepted queries' channels (for the
    Activation Bias): how many rows, their sum and their sum of squares [H * D] (float64). A row counts once,
    when it is accepted, in position order: speculation leaves the moments plain decoding gives."""

    def __init__(self, spec: LayerSpec, policy: EvictionPolicy):
        super().__init__(spec, policy)
        self.rows = 0
        self.s1: torch.Tensor | None = None  # [H * D] sum of the rows
        self.s2: torch.Tensor | None = None  # [H * D] sum of their squares

    def _count(self, rows: torch.Tensor) -> None:
        """Add rows [c, H * D] to the moments."""
        r = rows.double()
        if self.s1 is None:
            self.s1, self.s2 = r.sum(0), (r * r).sum(0)  # [H * D] x2
        else:
            self.s1, self.s2 = self.s1 + r.sum(0), self.s2 + (r * r).sum(0)
        self.rows += rows.shape[0]

    def observe(self, q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor | None, scale: float) -> None:
        T = q.shape[1]
        if T > SMALL:  # a prompt's pass: its rows before the window count now, the window's as they are kept
            self._commit(self.offset - T)
            self._count(q[0, : T - min(T, self.policy.window)].flatten(1))  # [T - w, H * D]
        super().observe(q, keys, visible, scale)

    def _keep_queries(self, q: torch.Tensor, positions: torch.Tensor) -> None:
        for t in range(q.shape[1]):  # q [H, c, D], accepted rows in position order: one at a time, as plain steps
            self._count(q[:, t].reshape(1, -1))
        super()._keep_queries(q, positions)

    def channel_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each channel's mean and variance over the accepted queries: [H * D] x2 (float64)."""
        mean = self.s1 / self.rows
        return mean, (self.s2 / self.rows - mean * mean).clamp_min(0.0)

    def probe(self) -> torch.Tensor:
        """The Activation-aware probe query [H, D]: the window queries weighted by their Activation Bias."""
        self._commit(self.offset)
        q = self.wq.float()  # [H, W, D]
        H, W, D = q.shape
        mean, var = self.channel_stats()  # [H * D] x2
        x = q.transpose(0, 1).reshape(W, H * D).double()  # [W, H * D]
        phi = ((x - mean) ** 2 / (var + var.mean() / 100)).mean(1)  # [W] the Activation Bias of each token
        total = float(phi.sum())
        w = phi / total if total > 0 and math.isfinite(total) else torch.full((W,), 1.0 / W, dtype=torch.float64)
        return (w.float()[None, :, None] * q).sum(1)  # [H, D]

    def probe_attention(self, scale: float) -> torch.Tensor:
        """The probe's attention over the held keys, averaged over each KV head's query heads [H_kv, n] (fp32).
        The probe stands at the window's end: it sees every held key."""
        p = self.probe()  # [H, D]
        H, D = p.shape
        Hk, n = self.spec.heads, self.n
        keys = self.k[0, :, :n].float().transpose(1, 2)[:, None]  # [H_kv, 1, D, n]
        logits = (p.view(Hk, H // Hk, 1, D) @ keys) * scale  # [H_kv, G, 1, n]
        return logits.softmax(-1)[:, :, 0].mean(1)  # [H_kv, n]


def density(attn: torch.Tensor, window: int) -> float:
    """Information density: the normalised entropy H(p) / log m of a probe distribution attn [H_kv, n] over its
    m candidate keys (the slots before the last `window`, renormalised), averaged over KV heads; 0 for m <= 1."""
    m = attn.shape[1] - min(window, attn.shape[1])
    if m <= 1:
        return 0.0
    p = attn[:, :m].double()
    p = p / p.sum(1, keepdim=True).clamp_min(1e-300)  # [H_kv, m]
    entropy = -(p * p.clamp_min(1e-300).log()).sum(1)  # [H_kv]
    return float(entropy.mean()) / math.log(m)


def share(weights: list[float], total: int, lo: list[int], hi: list[int]) -> list[int]:
    """Per-layer budgets clamp(c . w, lo, hi) summing to `total` where the bounds allow (c by bisection: the sum
    rises with c), floored to slots; all-zero weights share equally."""
    w = torch.tensor(weights, dtype=torch.float64)
    if not bool((w > 0).any()):
        w = torch.ones_like(w)
    lo_t, hi_t = torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)

    def fill(c: float) -> torch.Tensor:
        return torch.minimum(torch.maximum(c * w, lo_t), hi_t)

    a, b = 0.0, float(hi_t.max()) / float(w[w > 0].min())  # at b every weighted layer is at its upper bound
    for _ in range(100):
        mid = (a + b) / 2
        a, b = (mid, b) if float(fill(mid).sum()) < total else (a, mid)
    return [max(1, int(x + 1e-9)) for x in fill(b).tolist()]


class ActQKV(EvictionPolicy):
    """`--kv actqkv:budget=0.1,window=32,kernel=5`: see the module docstring."""

    def __init__(self, budget: float = 0.25, window: int = 32, kernel: int = 5, every: int = 0, chunk: int = 0):
        super().__init__(budget, window, every, chunk)
        self.kernel = validate.integer("kernel", kernel, 1, 63)
        self.attn: dict[int, torch.Tensor] = {}  # id(layer) -> its probe attention, from `allocate` to `scores`

    def layer(self, spec: LayerSpec) -> LayerKV:
        if spec.window is not None:
            return FullKV().layer(spec)
        return ActLayerKV(spec, self)

    def allocate(self, layers: list[EvictingLayerKV], keep: int, scale: float) -> list[int]:
        """The dynamic cut-off: budgets by information density, within [LOW, HIGH] x keep, summing to keep x
        layers."""
        self.attn = {}
        if len(layers) == 1:
            return [keep]
        self.attn = {id(layer): layer.probe_attention(scale) for layer in layers}  # `scores` reads them next
        eta = [density(self.attn[id(layer)], self.window) for layer in layers]
        hi = [min(layer.n, math.floor(HIGH * keep)) for layer in layers]
        lo = [min(h, math.ceil(LOW * keep)) for h in hi]
        return share(eta, keep * len(layers), lo, hi)

    def scores(self, layer: EvictingLayerKV, scale: float) -> torch.Tensor:
        """The pooled probe attention [H_kv, n]: the one `allocate` computed at this compression point (a
        layer's keys and queries do not change in between), else computed now."""
        attn = self.attn.pop(id(layer), None)
        return pooled(layer.probe_attention(scale) if attn is None else attn, self.kernel)  # [H_kv, n]
