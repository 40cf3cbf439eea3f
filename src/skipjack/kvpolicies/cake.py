"""CAKE, cascading and adaptive KV cache eviction (Qin et al. 2025): layers get budgets by their attention's
preference, and keys are kept by the mean and the variance of the attention they draw.

From each layer's window queries' attention A [heads, W, prefix keys] (causal, as SnapKV's):
- spatial dispersion H = -Σ A log A (the entropy, summed over heads and window rows), temporal shift
  V = Σ var_W(A) (each key's attention varies across the window rows: sums over keys and heads);
- the layer's preference P = H^(1/τ1) · V^(1/τ2), and its budget ∝ P out of budget × context × layers (each
  layer capped at what it holds, the excess shared by the others);
- a key's score: mean_W(A) + γ · var_W(A), average-pooled (kernel 5), averaged over each KV head's query heads;
  per KV head the best keys and the window are kept.

τ1 = τ2 = 1 and γ = 200 are the reference implementation's defaults (antgroup/cakekv: its fallback τ for a
model it has not tuned, and its γ). The paper cascades: it evicts each layer as its prompt pass ends, with the
budgets of the layers seen so far, to bound the memory during the prompt; skipjack runs the prompt in one pass,
so it allocates once over all layers, which is where the cascade ends (the final budgets are the same).
"""

from __future__ import annotations

import math

import torch

from skipjack import validate
from skipjack.kvpolicies.base import EvictingLayerKV, pooled
from skipjack.kvpolicies.snapkv import SnapKV


class CAKE(SnapKV):
    def __init__(
        self,
        budget: float = 0.25,
        window: int = 32,
        kernel: int = 5,
        tau1: float = 1.0,
        tau2: float = 1.0,
        gamma: float = 200.0,
        every: int = 0,
        chunk: int = 0,
    ):
        super().__init__(budget, window, kernel, every, chunk)
        self.tau1 = validate.number("tau1", tau1, 0.0, 100.0, lo_open=True)
        self.tau2 = validate.number("tau2", tau2, 0.0, 100.0, lo_open=True)
        self.gamma = validate.number("gamma", gamma, 0.0, 1e6)
        self._attn: dict[int, torch.Tensor] = {}  # within one compression: each layer's window attention

    def compress(self, cache) -> None:
        self._attn = {}  # each compression scores afresh
        super().compress(cache)
        self._attn = {}

    def _window(self, layer: EvictingLayerKV, scale: float) -> torch.Tensor:
        if id(layer) not in self._attn:
            self._attn[id(layer)] = layer.window_attention(scale)  # [H_kv, G, W, n]
        return self._attn[id(layer)]

    def preference(self, layer: EvictingLayerKV, scale: float) -> float:
        """log P = log(H)/τ1 + log(V)/τ2 (P = H^(1/τ1) · V^(1/τ2), in logs: a small τ overflows P itself) from the
        window's attention over the keys before the window."""
        attn = self._window(layer, scale)
        W = attn.shape[2]
        a = attn[..., : max(1, layer.n - W)]  # [H_kv, G, W, prefix]
        disp = float(-(a * (a + 1e-10).log()).sum())
        var = float(a.var(2).sum()) if W > 1 else 0.0
        return math.log(max(disp, 1e-12)) / self.tau1 + math.log(max(var, 1e-12)) / self.tau2

    def allocate(self, layers: list[EvictingLayerKV], keep: int, scale: float) -> list[int]:
        logs = torch.tensor([self.preference(layer, scale) for layer in layers], dtype=torch.float64)
        prefs = (logs - logs.max()).exp()  # P up to a common factor
        caps = torch.tensor([layer.n for layer in layers], dtype=torch.float64)
        total = float(keep * len(layers))
        out = torch.zeros(len(layers), dtype=torch.float64)
        free = torch.ones(len(layers), dtype=torch.bool)
        while free.any():  # proportional to P; a layer capped at what it holds gives the rest to the others
            share = prefs * free
            want = (total - float(out[~free].sum())) * share / float(share.sum())
            over = free & (want >= caps)
            if not over.any():
                out[free] = want[free]
                break
            out[over], free = caps[over], free & ~over
        return [max(1, int(b)) for b in out.tolist()]

    def scores(self, layer: EvictingLayerKV, scale: float) -> torch.Tensor:
        attn = self._attn.pop(id(layer), None)
        attn = layer.window_attention(scale) if attn is None else attn  # [H_kv, G, W, n]
        var = attn.var(2) if attn.shape[2] > 1 else torch.zeros_like(attn[:, :, 0])
        score = attn.mean(2) + self.gamma * var  # [H_kv, G, n]
        return pooled(score.mean(1), self.kernel)  # [H_kv, n]
