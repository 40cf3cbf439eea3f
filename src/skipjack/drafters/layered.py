"""What the drafters that run a model share (`swift`, `del`, `draft`): a draft head, a draft loop that stops on
low confidence, calibrated scores, and scratch use of the cache.

Draft head (`DraftHead`): the final norm and the LM head, or, with `vocab` > 0, FR-Spec's reduced head (Zhao
et al. 2025, "FR-Spec: Accelerating Large-Vocabulary Language Models via Frequency-Ranked Speculative
Sampling"): only the rows of the `vocab` most frequent tokens, so a draft pays for a fraction of the LM head
and can propose only those tokens. Verification keeps the full vocabulary, so the output is unchanged; a
token outside the subset is simply never drafted. Frequencies come from the engine (`Resources.token_counts`:
local text through the model's tokenizer, `skipjack.vocab`), handed to the drafter's `prepare`; without them
the head keeps the lowest token ids (plus any `seen` tokens, counted first).

Draft loop (`draft`): from the pending token, run one token at a time through the draft (`run(token,
position) -> hidden [1, 1, D]`), take the head's top-1 token and its probability; stop when it falls below
`threshold`, when the budget is spent, or when the sizer says one more node cannot pay (`DraftContext.more`).
With `width` > 1 the tree's width follows confidence: where the draft is confident it is a chain; where it
stops for want of confidence, the `width` likeliest tokens there become leaves (those whose score is at
least `LEAF`). A node's score is its path's probability times a calibration factor (realised over predicted
acceptances, `Calibrated`: learned across requests, so a drafter names it in its `LEARNED`). Nodes are listed
parents first; every leaf comes after the chain it hangs off, and scores never grow along a path.

Scratch keys: a draft pass writes keys at and after the pending token's position; the decode loop rewinds
them before verifying (`KVCache.rewind`), except for a proposal with `resume`, whose lower layers' keys are
exactly the verify pass's own (there the loop keeps them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from skipjack.decoding.proposal import DraftContext, Proposal, Verdict, judge
from skipjack.errors import SkipjackError
from skipjack.weights.linear import rows

LEAF = 0.05  # a leaf sibling scored below this is not worth a verify row


def ranking(counts: dict[int, int] | None, vocab: int, seen: list[int] = ()) -> list[int]:
    """Token ids, most frequent first: by `counts`, then the tokens in `seen`, then by id."""
    counts = dict(counts or {})
    for t in seen:
        counts[t] = counts.get(t, 0) + 1
    return sorted(range(vocab), key=lambda t: (-counts.get(t, 0), t))


class DraftHead:
    """Final norm + LM head for drafts; `vocab` > 0 keeps only the `vocab` most frequent tokens (FR-Spec)."""

    def __init__(self, model, vocab: int = 0, counts=None, seen: list[int] = (), norm: torch.Tensor | None = None):
        V = model.lm_head.out_features
        if vocab < 0:
            raise SkipjackError(f"vocab (draft head size, 0 = full) must be >= 0 (got {vocab})")
        self.model, self.ids, self.linear, self.norm = model, None, None, norm  # norm: a draft's own final norm
        if 0 < vocab < V:
            counts = counts() if callable(counts) else counts
            self.ids = torch.tensor(sorted(ranking(counts, V, seen)[:vocab]))  # [V']
            self.linear = rows(model.lm_head, self.ids)

    def top(self, h: torch.Tensor, k: int = 1) -> tuple[list[list[int]], list[list[float]]]:
        """Top-k tokens and probabilities per row of h [T, D] (probabilities over the head's vocabulary)."""
        logits = self.model.head(h[None], self.linear, self.norm)[0]  # [T, V']
        p, idx = torch.softmax(logits, dim=-1).topk(k, dim=-1)  # [T, k] x2
        if self.ids is not None:
            idx = self.ids[idx]
        return idx.tolist(), p.tolist()

    def argmax(self, h: torch.Tensor) -> list[int]:
        """Top-1 token per row of h [T, D]."""
        return [t[0] for t in self.top(h)[0]]


class Calibrated:
    """How far the draft's probabilities are from its realised acceptance: realised over predicted
    acceptances of every node the emitted tokens could judge, over all requests (with pseudo-counts)."""

    PRIOR = 4.0

    def __init__(self):
        self.pred, self.got = 0.0, 0.0

    @property
    def factor(self) -> float:
        return min(1.5, max(0.2, (self.got + self.PRIOR) / (self.pred + self.PRIOR)))

    def learn(self, proposal: Proposal, verdict: Verdict, raw: list[float]) -> None:
        """`raw`: each node's uncalibrated path probability."""
        paths: list[list[int]] = []
        for tok, par in zip(proposal.tokens, proposal.parents):
            paths.append((paths[par] if par >= 0 else []) + [tok])
        for path, p in zip(paths, raw):
            hit = judge(path, verdict.tokens)
            if hit is not None:
                self.pred, self.got = self.pred + p, self.got + float(hit)


def draft(
    ctx: DraftContext,
    run: Callable[[int, int], torch.Tensor],
    head: DraftHead,
    threshold: float,
    calib: Calibrated,
    width: int = 1,
    hidden: list | None = None,
) -> tuple[Proposal | None, list[float]]:
    """A confidence-stopped draft (module doc) and each node's raw path probability. `hidden`, if a list,
    gets the draft's hidden state for the root and every node (a node's own pass is run if the loop ended
    before it), for a proposal that resumes from it."""
    tokens, parents, raw, chain = [], [], [], []
    x, pos, p, parent = ctx.tokens[-1], ctx.cache.offset, 1.0, -1
    while len(tokens) < ctx.budget:
        h = run(x, pos)  # [1, 1, D]
        if hidden is not None:
            hidden.append(h)
        top, prob = head.top(h[0], max(1, width))
        if prob[0][0] < threshold:  # not confident: stop here, with the likeliest `width` tokens as leaves
            for t, q in list(zip(top[0], prob[0]))[: len(top[0]) if width > 1 else 0]:
                if q * p * calib.factor >= LEAF and len(tokens) < ctx.budget:
                    tokens.append(t), parents.append(parent), raw.append(p * q)
            break
        p *= prob[0][0]
        tokens.append(top[0][0]), parents.append(parent), raw.append(p)
        parent, x, pos = len(tokens) - 1, top[0][0], pos + 1
        chain.append(p * calib.factor)
        if len(tokens) >= ctx.budget or not ctx.more(chain):
            if hidden is not None:
                hidden.append(run(x, pos))
            break
    if not tokens:
        return None, []
    scores = [min(1.0, r * calib.factor) for r in raw]
    return Proposal(tokens, parents, scores), raw


def target(resources, name: str):
    """The target model a drafter's `prepare` was lent (`Resources.model`), or a one-line error."""
    if resources is None or resources.model is None:
        raise SkipjackError(f"{name}: prepare needs the target model (Resources.model)")
    return resources.model


def prepared(model, ctx: DraftContext, name: str) -> None:
    """Refuse a request's draft before `prepare` ran, or for another model than the one prepared for."""
    if model is None:
        raise SkipjackError(f"{name}: the drafter was not prepared (call prepare(resources) before any request)")
    if ctx.model is not None and ctx.model is not model:
        raise SkipjackError(f"{name}: the drafter was prepared for another model than this request's")


def resumable(model) -> bool:
    """Whether a draft's lower-layer keys and hidden states are the verify pass's own, bit for bit: where the
    forward is batch-invariant (`DecoderLM.invariant`); elsewhere the verify pass recomputes them."""
    return bool(getattr(model, "invariant", False))
