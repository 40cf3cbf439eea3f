"""TidalDecode (Yang et al. 2024): position-persistent sparse attention. Every key stays in memory (no saving);
most layers attend to a few selected positions, chosen by the few layers that attend to all of them.

Per decoding step (one new token): layers 0 and 1 attend fully; the token-selection layers (layer 2 and one
re-selection layer at ~40% of the depth, layer 13 of Llama-3-8B's 32) attend fully too, and their query picks
the top `budget` × the context positions per KV head (by the attention its query heads give them); every
other layer attends only to the positions the last selection layer chose, and to the new token. Prompts and
passes of several tokens attend fully. Cache correction: every `correct` sparse steps, one step attends fully
in every layer (the paper recomputes the keys of those steps; here the next step is dense, which bounds how
long a selection's error can feed the keys written under it). Lossy; plain steps only (a verify pass would
attend fully and so disagree with the steps it checks).
"""

from __future__ import annotations

import math

import torch

from skipjack import validate
from skipjack.cache import CachePolicy, FullKV, KVCache, LayerKV, LayerSpec


class TidalLayerKV(LayerKV):
    """A full-attention layer cache whose one-token steps may return only the selected keys."""

    def __init__(self, spec: LayerSpec, policy: TidalDecode, shared: dict):
        super().__init__(spec.batch, spec.heads, spec.head_dim, spec.capacity, spec.dtype)
        self.role, self.shared, self.policy = policy.role(spec.index, shared["layers"]), shared, policy
        self.observes = self.role == "select"

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int):
        keys, vals, past = super().update(k, v, start)  # [1, H_kv, S, D] x2
        sel = self.shared.get("sel")
        if self.role != "sparse" or k.shape[2] != 1 or sel is None or self.shared["dense"]:
            return keys, vals, past
        H, C, D = self.k.shape[1:]
        rows = (sel + torch.arange(H)[:, None] * C).flatten()  # [H_kv * n] rows of the [H_kv * C, D] buffer
        keys = self.k[0].view(H * C, D).index_select(0, rows).view(1, H, -1, D)  # [1, H_kv, n, D]: row copies
        vals = self.v[0].view(H * C, D).index_select(0, rows).view(1, H, -1, D)
        return torch.cat([keys, k], 2), torch.cat([vals, v], 2), sel[0]  # [1, H_kv, n + 1, D] x2; all visible

    def observe(self, q: torch.Tensor, keys: torch.Tensor, visible, scale: float) -> None:
        """A selection layer's one-token step: the top positions by its query heads' attention [H_kv, n]."""
        T, S = q.shape[1], keys.shape[2]
        if T != 1:
            self.shared["sel"] = None
            return
        n = math.ceil(self.policy.budget * (S - 1))
        if n >= S - 1:
            self.shared["sel"] = None
            return
        H, D = q.shape[2], q.shape[3]
        Hk = keys.shape[1]
        logits = (q[0, 0].view(Hk, H // Hk, 1, D) @ keys[0, :, : S - 1].transpose(1, 2)[:, None]) * scale
        probs = logits.float().softmax(-1).sum((1, 2))  # [H_kv, S - 1]
        self.shared["sel"] = probs.topk(n, dim=1).indices.sort(dim=1).values  # [H_kv, n]


class TidalDecode(CachePolicy):
    """`--kv tidal:budget=0.1,correct=32`: see the module docstring."""

    lossless = False
    plain_only = True
    holds_every_key = False  # every key is in memory, but most layers' steps attend to a selection

    def __init__(self, budget: float = 0.1, correct: int = 32):
        self.budget = validate.number("budget (the selected fraction of the context)", budget, 0.0, 1.0, lo_open=True)
        self.correct = validate.integer("correct", correct, 0, 1 << 20)
        self.shared: dict = {}

    @staticmethod
    def role(i: int, layers: int) -> str:
        reselect = max(3, round(layers * 13 / 32))
        if i < 2:
            return "full"
        return "select" if i in (2, reselect) else "sparse"

    def layer(self, spec: LayerSpec) -> LayerKV:
        if spec.index == 0:
            self.shared = {"sel": None, "dense": False, "layers": spec.layers, "steps": 0}
        if spec.window is not None:
            return FullKV().layer(spec)
        return TidalLayerKV(spec, self, self.shared)

    def settle(self, cache: KVCache) -> None:
        """A step is done: count it; every `correct` sparse steps, the next one is dense."""
        s = self.shared
        s["sel"] = None
        if s["dense"]:
            s["dense"], s["steps"] = False, 0
            return
        s["steps"] += 1
        s["dense"] = bool(self.correct) and s["steps"] >= self.correct
