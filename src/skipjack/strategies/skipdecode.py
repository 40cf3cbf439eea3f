"""SkipDecode (Del Corro et al. 2023, "SkipDecode: Autoregressive Skip Decoding with Batching and Caching for
Efficient LLM Inference").

Each generated position t has one exit point, and the number of layers a token runs never grows along the
sequence: t skips s_t = round(M * (lo + (hi - lo) * t / (N - 1))) layers, M = L - warmup - 1 the layers that
may be skipped, N the request's token budget, lo <= hi the skipped shares at the first and last position (a
linear schedule, as in the paper). The skipped layers are the lower and middle ones, right above `warmup`
always-run bottom layers: the token's hidden state after layer warmup - 1 (its embedding when warmup = 0)
goes straight into layer warmup + s_t, and every layer above runs. Since s_t never decreases, every layer a
token runs has run for all earlier tokens, so its keys exist: nothing is copied or recomputed (the reason to
bypass low layers rather than exit early). The prompt runs every layer.
"""

from __future__ import annotations

import torch

from skipjack.errors import SkipjackError
from skipjack.strategies.base import Strategy, count, fraction


class SkipDecode(Strategy):
    name = "skipdecode"

    def __init__(self, lo: float = 0.0, hi: float = 0.5, warmup: int = 1):
        self.lo, self.hi = fraction(self.name, "lo", lo), fraction(self.name, "hi", hi)
        self.warmup = count(self.name, "warmup", warmup)
        if self.lo > self.hi:
            raise SkipjackError(f"skipdecode: lo ({self.lo}) must not exceed hi ({self.hi})")

    def begin(self, model, prompt_len: int, max_new: int) -> None:
        super().begin(model, prompt_len, max_new)
        if self.warmup > model.num_layers - 1:
            raise SkipjackError(f"skipdecode: warmup must be < {model.num_layers} (the layers; got {self.warmup})")
        self.top = 0

    def skips(self, t: int) -> int:
        """Layers skipped by generated token t (non-decreasing in t)."""
        m = self.model.num_layers - self.warmup - 1
        span = self.max_new - 1
        share = self.lo + (self.hi - self.lo) * (min(t, span) / span if span else 1.0)
        return round(m * share)

    def forward(self, model, ids, cache, index: int):
        T, outs, a = ids.shape[1], [], 0
        while a < T:  # runs of tokens with the same exit point: one forward each
            s = self.skips(index + a)
            b = a + 1
            while b < T and self.skips(index + b) == s:
                b += 1
            layers = [*range(self.warmup), *range(self.warmup + s, model.num_layers)]
            self.top = max(self.top, s)
            self.count(b - a, len(layers), 0)
            outs.append(model(ids[:, a:b], cache, layers=layers))
            a = b
        if len(outs) == 1:
            return outs[0]
        outs[-1].logits = torch.cat([o.logits for o in outs], 1)  # [1, T, V]
        return outs[-1]

    def keeps_cache_whole(self) -> bool:
        return self.top == 0
