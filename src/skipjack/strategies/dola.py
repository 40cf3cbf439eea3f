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


def candidates(spec: str, n: int, name: str = "dola") -> list[int]:
    """Candidate premature layers in HF's hidden-state count (0 = embeddings, j = layer j's output), for `n`
    layers; the final layer (n) is never one (`name`: the method, in errors)."""
    if spec == "low":
        return list(range(0, n // 2, 2)) if n <= 40 else list(range(0, 20, 2))
    if spec == "high":
        return list(range(n // 2, n, 2)) if n <= 40 else list(range(n - 20, n, 2))
    lo, sep, hi = spec.partition("-")
    if not (sep and lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
        raise SkipjackError(f"{name}: layers must be low, high or A-B with A <= B (got {spec!r})")
    if int(hi) >= n:
        raise SkipjackError(f"{name}: layers {spec} must be below the final layer {n} (this model has {n} layers)")
    return list(range(int(lo), int(hi) + 1))


def jsd(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence between two distributions given as log-probabilities [..., V] (natural log)
    -> [...]: H(m) - (H(p) + H(q)) / 2 with m = (p + q) / 2, one logarithm over the vocabulary."""
    p, q = logp.exp(), logq.exp()  # [..., V]
    m = 0.5 * (p + q)  # [..., V]
    return 0.5 * ((p * logp).sum(-1) + (q * logq).sum(-1)) - torch.special.xlogy(m, m).sum(-1)


def contrast(final: torch.Tensor, early: torch.Tensor, alpha: float, weight: float):
    """DoLa's scores [T, V] from the final logits [T, V] and the candidates' logits [J, T, V], and the index of
    the premature candidate chosen at each position [T]."""
    logq = torch.log_softmax(final.float(), -1)  # [T, V]
    prem, k = premature(logq, torch.log_softmax(early.float(), -1))  # [T, V], [T]
    return plausible(logq, logq - weight * prem, alpha), k


def premature(top: torch.Tensor, early: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic premature layer selection: for each position, the log-probabilities [T, V] of the candidate (of
    early [J, T, V]) of largest JSD from `top` [T, V] (log-probabilities), and the candidates' indices [T]."""
    k = jsd(top[None], early).argmax(0)  # [T]
    return early[k, torch.arange(top.shape[0])], k


def plausible(logq: torch.Tensor, scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """The adaptive plausibility constraint: `scores` [T, V] where q_N >= alpha · max q_N (logq [T, V]),
    IMPLAUSIBLE elsewhere."""
    keep = logq >= logq.max(-1, keepdim=True).values + torch.log(torch.tensor(alpha))  # [T, V]
    return torch.where(keep, scores, torch.full_like(scores, IMPLAUSIBLE))


def _weight(name: str, key: str, value, top: float) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= top
    if not ok:
        raise SkipjackError(f"{name}: {key} must be a number in [0, {top:g}] (got {value!r})")
    return float(value)


class LayerContrast(Strategy):
    """What DoLa and LOL share: one pass that returns the candidate layers' hidden states, each read through the
    final norm and the LM head in one call (`early`), and the scores at every position, the prompt's last one
    included (`scores_prompt`: the first generated token is the method's too)."""

    scores_prompt = True
    layers = "high"

    def contrast_options(self, layers, alpha, weight, penalty) -> None:
        """The options DoLa and LOL share, checked: candidate layers, α, the amateur's weight, the penalty."""
        if not isinstance(layers, str):
            raise SkipjackError(f"{self.name}: layers must be low, high or A-B (got {layers!r})")
        if layers not in ("low", "high"):
            candidates(layers, 10**6, self.name)  # checks the form "A-B" now; the model's depth at `begin`
        self.layers = layers
        self.alpha = fraction(self.name, "alpha", alpha)
        if self.alpha == 0:
            raise SkipjackError(f"{self.name}: alpha must be in (0, 1) (got 0)")
        self.weight = _weight(self.name, "weight", weight, 4)
        if not (isinstance(penalty, (int, float)) and not isinstance(penalty, bool) and 1 <= penalty <= 4):
            raise SkipjackError(f"{self.name}: penalty (repetition) must be a number in [1, 4] (got {penalty!r})")
        self.repetition_penalty = float(penalty)

    def begin(self, model, prompt_len: int, max_new: int) -> None:
        super().begin(model, prompt_len, max_new)
        self.cands = self.wanted(model)  # a bad layer range fails here, before any step
        self.picked: dict[int, int] = getattr(self, "picked", {})  # premature layer -> how often chosen

    def wanted(self, model) -> list[int]:
        """Hidden-state layers (HF's count: 0 = the embeddings) whose distributions the scores read."""
        return candidates(self.layers, model.num_layers, self.name)

    def early(self, model, ids: torch.Tensor, out, js: list[int], rows: slice) -> torch.Tensor:
        """The distributions' logits [J, T', V] of hidden-state layers `js` at positions `rows`."""
        hs = [(model.embed(ids) if j == 0 else out.hidden[j - 1])[0, rows] for j in js]  # J x [T', D]
        return model.head(torch.stack(hs))  # [J, T', V]: one call, the head's weights read once for all rows

    def run(self, model, ids: torch.Tensor, cache, logits: str, rows: slice):
        want = [j - 1 for j in self.wanted(model) if j > 0]
        out = model(ids, cache, return_hidden=want, logits=logits)
        out.logits = self.scores(model, ids, out, rows)[None]  # [1, T', V]
        return out

    def forward(self, model, ids, cache, index: int):
        self.count(ids.shape[1], model.num_layers, 0)
        return self.run(model, ids, cache, "all", slice(None))

    def prompt_forward(self, model, ids, cache):
        self.picked = {}  # the prompt runs before `begin`, which keeps what it chose
        return self.run(model, ids, cache, "last", slice(-1, None))

    def scores(self, model, ids: torch.Tensor, out, rows: slice) -> torch.Tensor:
        raise NotImplementedError

    def chose(self, layers: list[int]) -> None:
        for j in layers:
            self.picked[j] = self.picked.get(j, 0) + 1

    def stats(self) -> dict:
        return super().stats() | {"premature_layers": dict(sorted(self.picked.items()))}


class DoLa(LayerContrast):
    name = "dola"

    def __init__(self, layers: str = "high", alpha: float = 0.1, weight: float = 1.0, penalty: float = 1.2):
        self.contrast_options(layers, alpha, weight, penalty)

    def scores(self, model, ids, out, rows):
        cands = self.wanted(model)
        scores, pick = contrast(out.logits[0], self.early(model, ids, out, cands, rows), self.alpha, self.weight)
        self.chose([cands[k] for k in pick.tolist()])
        return scores
