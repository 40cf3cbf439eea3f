"""LOL, "Lower Layers Matter" (Chen et al. 2024, "Lower Layer Matters: Alleviating Hallucination via Multi-Layer
Fusion Contrastive Decoding with Truthfulness Refocused"). Lossy by design, aimed at factual answers.

The paper contrasts the original model with an amateur (a model with induced hallucination) at the final layer
and at a lower layer, fuses the two contrasts, and adds a truthfulness-refocused term from the same model given
an instruction that asks for the truth. With one model and no trained amateur, the amateur here is the model's
own premature view, as in DoLa (`strategies.dola`). Per position, from one pass over the layers:
1. final contrast  C_N = log q_N - w · log q_M, M the candidate layer of largest JSD(q_N || q_j) below N;
2. lower contrast  C_L = log q_L - w · log q_K, L the lower mature layer (`lower`, HF's hidden-state count; default
   three quarters of the depth) and K the candidate below L of largest JSD(q_L || q_j);
3. refocus         R   = log q_G - log q_N, q_G the final layer's distribution when the context starts with a
   truthfulness instruction (`GUIDANCE`), decoded beside the request in a cache of its own (one more pass per
   step: the price of the refocus; `refocus=0` turns it off and costs nothing);
4. scores  C_N + fuse · C_L + refocus · R over the tokens with q_N >= α · max q_N (DoLa's plausibility
   constraint), the paper's repetition penalty (1.2) as in DoLa.
The amateur's weight w (`weight`) is 1 in the paper; `fuse=0, refocus=0` is DoLa with the same candidates, and
`weight=0, fuse=0, refocus=0` is plain decoding (the most likely token is always plausible).
"""

from __future__ import annotations

import torch

from skipjack.errors import SkipjackError
from skipjack.strategies.dola import LayerContrast, _weight, candidates, plausible, premature

GUIDANCE = "Answer with the true fact only, as an encyclopedia would.\n"  # the refocus instruction


class LOL(LayerContrast):
    name = "lol"
    guidance = GUIDANCE

    def __init__(self, layers="high", lower=-1, fuse=0.5, refocus=0.5, weight=1.0, alpha=0.1, penalty=1.2):
        self.contrast_options(layers, alpha, weight, penalty)
        if not isinstance(lower, int) or isinstance(lower, bool) or lower < -1 or lower == 0:
            raise SkipjackError(f"lol: lower must be a layer >= 1 (got {lower!r})")
        self.lower = lower
        self.fuse, self.refocus = _weight(self.name, "fuse", fuse, 4), _weight(self.name, "refocus", refocus, 4)
        self.guide_ids: list[int] = []  # GUIDANCE's token ids: the engine sets them (tokenizers live at the edge)
        self.guided = None  # the refocus context's cache

    def levels(self, model) -> tuple[int, list[int], list[int]]:
        """The lower mature layer L, the final contrast's candidates and the lower contrast's (below L)."""
        n = model.num_layers
        low = self.lower if self.lower > 0 else (3 * n) // 4
        if low >= n:
            raise SkipjackError(f"lol: lower {low} must be below the final layer {n}")
        cands = candidates(self.layers, n, self.name)
        below = [j for j in cands if j < low] or list(range(0, low, 2))
        return low, cands, below

    def wanted(self, model) -> list[int]:
        low, cands, below = self.levels(model)
        return sorted({low, *cands, *below})

    def prompt_started(self, model, prompt: list[int], max_new: int) -> None:
        """Before the prompt runs: the refocus context (the instruction, then the prompt) gets a cache."""
        self.guided = None
        if self.refocus > 0:
            ids = self.guide_ids + list(prompt)
            self.guided = model.make_cache(min(model.config.max_position_embeddings, len(ids) + max_new + 1))
            self.guided_first = model(torch.tensor([ids]), self.guided, logits="last").logits[0, -1:]  # [1, V]

    def refocused(self, model, ids: torch.Tensor, rows: slice) -> torch.Tensor | None:
        """The refocus context's logits [T', V] for the positions `rows` of this pass."""
        if self.guided is None:
            return None
        if rows.start == -1:  # the prompt's last position: run when the context started
            return self.guided_first
        return model(ids, self.guided, logits="all").logits[0][rows]  # [T', V]

    def scores(self, model, ids, out, rows):
        low, cands, below = self.levels(model)
        js = self.wanted(model)
        logits = torch.log_softmax(self.early(model, ids, out, js, rows).float(), -1)  # [J, T', V]
        at = {j: logits[i] for i, j in enumerate(js)}
        logq = torch.log_softmax(out.logits[0].float(), -1)  # [T', V]
        prem, k = premature(logq, torch.stack([at[j] for j in cands]))
        lprem, _ = premature(at[low], torch.stack([at[j] for j in below]))
        w = self.weight
        s = (logq - w * prem) + self.fuse * (at[low] - w * lprem)  # [T', V]
        guided = self.refocused(model, ids, rows)
        if guided is not None:
            s = s + self.refocus * (torch.log_softmax(guided.float(), -1) - logq)
        self.chose([cands[i] for i in k.tolist()])
        return plausible(logq, s, self.alpha)
