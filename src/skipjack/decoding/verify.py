"""The one verifier: decide which drafted tokens the target model accepts, for chains and token trees.

Layout: the verify forward runs T = 1 + N tokens: index 0 is the pending (last emitted, not yet cached)
token, index i+1 is draft node i. Logits at index j give the target's next-token distribution after the
path root..j, so node c (child of j) is judged against row j.

Greedy: walk from the root, following the child whose token equals the target's argmax; emit the accepted
tokens and then the target's own argmax at the last accepted node (the bonus token). This reproduces plain
greedy decoding exactly.

Sampling: speculative rejection sampling (Leviathan et al. 2023, Alg. 1; Chen et al. 2023), extended to
trees with SpecInfer's multi-candidate rule (Miao et al. 2024): at node j with target distribution p, try its
children c_1..c_m in order; accept c_i with probability min(1, p(x_i) / q_i(x_i)); on rejection set
p <- norm(max(0, p - q_i)) and try the next child; if no child is accepted, sample from the residual p.
A deterministic draft (prompt lookup, n-grams) has one-hot q, so rejection simply removes x_i from p.
This preserves the target distribution exactly when siblings are distinct deterministic tokens or i.i.d.
samples of q. All distributions pass through `sampling.probs`, so the warpers apply to p and q alike.
"""

from __future__ import annotations

import torch

from skipjack.decoding.proposal import Proposal, Verdict
from skipjack.decoding.sampling import SamplingParams, adjust, probs


def tree_mask(parents: list[int]) -> torch.Tensor:
    """Ancestor-or-self mask [T, T] over root + nodes; `parents` uses -1 for the root."""
    T = len(parents) + 1
    m = torch.eye(T, dtype=torch.bool)  # [T, T]
    m[:, 0] = True
    for i, par in enumerate(parents, start=1):
        if par >= 0:
            m[i] |= m[par + 1]
    return m


def target_probs(
    logits,
    proposal: Proposal,
    params: SamplingParams,
    seen: torch.Tensor | None,
    counts: torch.Tensor | None = None,
    generated: int = 0,
    allowed: torch.Tensor | None = None,
):
    """Warped target distributions [T, V] for every verify row. The history before the step: `seen` [V] marks
    tokens already in the context (repetition penalty), `counts` [V] the output's token counts (frequency and
    presence penalties), `generated` the tokens generated so far (`min_tokens`); each row adds the draft tokens
    on its own path, as plain decoding would have seen them. `allowed` [T, V]: a grammar's mask after each row's
    path (`Constraint.rows`)."""
    if params.adjusted or allowed is not None:
        T, V = logits.shape
        onehot = torch.zeros(T, V, dtype=torch.float64)  # [T, V]
        if T > 1:
            onehot[torch.arange(1, T), torch.tensor(proposal.tokens)] = 1.0
        anc = tree_mask(proposal.parents).double()  # [T, T]
        path = anc @ onehot  # [T, V] each token's count on each row's path (exact: small integers)
        depth = anc.sum(-1).long() - 1  # [T] draft tokens on each row's path
        rows_seen = None
        if seen is not None and params.repetition_penalty != 1.0:
            rows_seen = (path > 0) | seen[None, :]
        rows_counts = None
        if params.frequency_penalty or params.presence_penalty:
            rows_counts = path if counts is None else path + counts[None, :]
        logits = adjust(logits, params, rows_seen, rows_counts, generated + depth, allowed)
    return probs(logits, params)


def verify(
    logits: torch.Tensor,  # [T, V] fp32 target logits for root + nodes
    proposal: Proposal,
    params: SamplingParams,
    gen: torch.Generator | None = None,
    seen: torch.Tensor | None = None,  # [V] bool, tokens in the context (repetition penalty)
    argmax: list[int] | None = None,  # [T] each row's argmax, where the forward computed it
    counts: torch.Tensor | None = None,  # [V] the output's token counts (frequency, presence penalties)
    generated: int = 0,  # tokens generated before this step (min_tokens)
    allowed: torch.Tensor | None = None,  # [T, V] bool, a grammar's mask per row (`constraint.Constraint.rows`)
) -> Verdict:
    children = proposal.children()
    toks = proposal.tokens
    raw = logits.argmax(-1).tolist() if argmax is None else argmax  # [T]
    hist = (seen, counts, generated, allowed)
    if params.greedy:
        adjusted = params.adjusted or allowed is not None
        target = target_probs(logits, proposal, params, *hist).argmax(-1).tolist() if adjusted else raw
        path, row = [], 0
        while (c := children[row].get(target[row])) is not None:
            path.append(c)
            row = c + 1
        return Verdict([toks[c] for c in path] + [target[row]], path, raw)
    p_all = target_probs(logits, proposal, params, *hist)  # [T, V]
    path, row = [], 0
    while True:
        p = p_all[row].clone()
        accepted = None
        for tok, c in children[row].items():
            q = proposal.q[c] if proposal.q is not None else None  # [V] or one-hot
            qx = float(q[tok]) if q is not None else 1.0
            u = float(torch.rand((), generator=gen))
            if qx > 0 and u < min(1.0, float(p[tok]) / qx):
                accepted = c
                break
            p = (p - q).clamp_min(0) if q is not None else p.index_fill(0, torch.tensor([tok]), 0.0)
            total = p.sum()
            if total <= 0:  # cannot happen for a valid q; guard against fp round-off
                p = p_all[row].clone()
                break
            p = p / total
        if accepted is None:
            bonus = int(torch.multinomial(p, 1, generator=gen))
            return Verdict([toks[c] for c in path] + [bonus], path, raw)
        path.append(accepted)
        row = accepted + 1
