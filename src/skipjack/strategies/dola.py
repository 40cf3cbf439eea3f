"""DoLa (Chuang et al. 2024, "DoLa: Decoding by Contrasting Layers Improves Factuality in Large Language
Models"). Lossy by design: it changes which token wins, aiming at factual answers.

Each step runs every layer once (the layer-addressable forward returns the candidate layers' hidden states
from the same pass) and, per position:
1. the final layer's distribution q_N and each candidate premature layer's q_j (its hidden state through the
   final norm and the LM head: an early exit);
2. the premature layer M = argmax_j JSD(q_N || q_j) (dynamic premature layer selection);
3. the scores: log q_N - w · log q_M over the plausible tokens, those with q_N >= α · max q_N (the adaptive
   plausibility constraint, α = 0.1); every other token gets a score no token can win with. w = 1 is the
   paper's contrast; w = 0 is plain decoding (the most likely token is always plausible).
4. The paper pairs DoLa with a repetition penalty of 1.2 over prompt and output: a request that leaves
   `repetition_penalty` at 1 gets the strategy's `penalty` (default 1.2; `dola:penalty=1` turns it off), which
   the sampler applies to these scores.

Candidate layers (`layers`): "low" or "high", as in the paper's code (HF transformers' `dola_layers`): every
second layer of the lower or upper half, counted as HF counts hidden states (0 = the embeddings, j = layer
j's output), the final layer excluded; or "A-B", layers A..B inclusive in that count. The prompt's own last
token (the first generated one) comes from the prefill, which every method runs plainly.
"""

from __future__ import annotations

import torch

from skipjack.errors import SkipjackError
from skipjack.strategies.base import Strategy, fraction

IMPLAUSIBLE = -1e30  # the score of a token outside the plausible set (finite: the decode loop refuses inf)


def candidates(spec: str, n: int) -> list[int]:
    """Candidate premature layers in HF's hidden-state count (0 = embeddings, j = layer j's output), for `n`
    layers; the final layer (n) is never one."""
    if spec == "low":
        return list(range(0, n // 2, 2)) if n <= 40 else list(range(0, 20, 2))
    if spec == "high":
        return list(range(n // 2, n, 2)) if n <= 40 else list(range(n - 20, n, 2))
    lo, sep, hi = spec.partition("-")
    if not (sep and lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
        raise SkipjackError(f"dola: layers must be low, high or A-B with A <= B (got {spec!r})")
    if int(hi) >= n:
        raise SkipjackError(f"dola: layers {spec} must be below the final layer {n} (this model has {n} layers)")
    return list(range(int(lo), int(hi) + 1))


def jsd(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence between distributions p [..., V] and q [..., V] (natural log) -> [...]."""
    m = 0.5 * (p + q)
    kl = lambda a: (a * (torch.log(a.clamp_min(1e-30)) - torch.log(m.clamp_min(1e-30)))).sum(-1)  # noqa: E731
    return 0.5 * kl(p) + 0.5 * kl(q)


def contrast(final: torch.Tensor, early: list[torch.Tensor], alpha: float, weight: float):
    """DoLa's scores [T, V] from the final logits [T, V] and each candidate's logits [T, V], and the index of the
    premature candidate chosen at each position [T]."""
    logq = torch.log_softmax(final.float(), -1)  # [T, V]
    logqs = torch.stack([torch.log_softmax(e.float(), -1) for e in early])  # [J, T, V]
    div = jsd(logq.exp()[None], logqs.exp())  # [J, T]
    pick = div.argmax(0)  # [T]
    prem = logqs[pick, torch.arange(final.shape[0])]  # [T, V]
    scores = logq - weight * prem  # [T, V]
    plausible = logq >= logq.max(-1, keepdim=True).values + torch.log(torch.tensor(alpha))  # [T, V]
    return torch.where(plausible, scores, torch.full_like(scores, IMPLAUSIBLE)), pick


class DoLa(Strategy):
    name = "dola"

    def __init__(self, layers: str = "high", alpha: float = 0.1, weight: float = 1.0, penalty: float = 1.2):
        if not isinstance(layers, str):
            raise SkipjackError(f"dola: layers must be low, high or A-B (got {layers!r})")
        self.layers = layers
        if layers not in ("low", "high"):
            candidates(layers, 10**6)  # checks the form "A-B" now; the model's depth at `begin`
        self.alpha = fraction(self.name, "alpha", alpha)
        if self.alpha == 0:
            raise SkipjackError("dola: alpha must be in (0, 1) (got 0)")
        ok = isinstance(weight, (int, float)) and not isinstance(weight, bool) and 0 <= weight <= 4
        if not ok:
            raise SkipjackError(f"dola: weight must be a number in [0, 4] (got {weight!r})")
        self.weight = float(weight)
        ok = isinstance(penalty, (int, float)) and not isinstance(penalty, bool) and 1 <= penalty <= 4
        if not ok:
            raise SkipjackError(f"dola: penalty (repetition) must be a number in [1, 4] (got {penalty!r})")
        self.repetition_penalty = float(penalty)

    def begin(self, model, prompt_len: int, max_new: int) -> None:
        super().begin(model, prompt_len, max_new)
        self.cands = candidates(self.layers, model.num_layers)
        self.picked: dict[int, int] = {}  # premature layer -> how often chosen

    def forward(self, model, ids, cache, index: int):
        want = [j - 1 for j in self.cands if j > 0]
        out = model(ids, cache, return_hidden=want, logits="all")
        early = [model.head(model.embed(ids) if j == 0 else out.hidden[j - 1])[0] for j in self.cands]  # [T, V]
        scores, pick = contrast(out.logits[0], early, self.alpha, self.weight)
        for k in pick.tolist():
            self.picked[self.cands[k]] = self.picked.get(self.cands[k], 0) + 1
        self.count(ids.shape[1], model.num_layers, 0)
        out.logits = scores[None]  # [1, T, V]
        return out

    def stats(self) -> dict:
        return super().stats() | {"premature_layers": dict(sorted(self.picked.items()))}
