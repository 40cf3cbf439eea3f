"""`del`: early-exit self-speculation with a dynamic exit layer (DEL, Zarch et al. 2025, "Context-Aware Dynamic
Exit Layer for Efficient Self-Speculative Decoding"), on LayerSkip's draft-then-verify (Elhoushi et al. 2024).

Draft: layers 0..E, then the final norm and the LM head (or FR-Spec's reduced head: `vocab`), one token at a
time from the pending token, until the top-1 probability falls below `threshold` or one more node cannot pay.

Choosing E and the draft length: α_ℓ, the chance that an exit after layer ℓ predicts the full model's next
token, is estimated from shadow tokens: every `probe_every` steps the head is applied to layer ℓ's hidden
state at each verify row whose next token was just decided (the root and the accepted nodes), for a rotating
set of layers; a hit is a shadow token equal to the emitted token. α_ℓ is the hit rate with a prior of mean
(ℓ + 1) / L worth two tokens. E and the length k maximise the expected tokens per layer of compute, with
the LM head counted as H layers (its weight bytes over a layer's; a plain step is L + H, a verify pass of a
few tokens costs about one plain step):

    (1 + α + ... + α^k) / (((k + 1)(ℓ + 1 + H) + (L - ℓ - 1) + H) / (L + H))    (resumed verify, below)
    (1 + α + ... + α^k) / ((k (ℓ + 1 + H) + L + H) / (L + H))                  (full verify)

k caps the draft. The choice is deterministic (no sampling), so it is reproducible. Where no exit is expected
to beat plain decoding (value <= 1: a small model's early exits rarely agree with its last layer), `del`
drafts nothing but a one-node probe every 4 x `probe_every` steps, which keeps the shadow tokens coming.

KV reuse (LayerSkip's exit-query cache): where the model is batch-invariant (`layered.resumable`), the
draft's keys in layers 0..E and its hidden state after E are bit for bit what the verify pass would compute,
so verification runs only layers E+1.. from there (`Proposal.resume`) and the lower layers are computed once
per token. Elsewhere (fp32 kernels round a chain pass differently from one-token passes) the verify pass
recomputes every layer, and the draft's keys are scratch.

State: `prepare` builds the draft head and checks `exit` against the model (nothing is timed, searched or
written: no part of `del` measures time or keeps files). What is learned across requests is the drafter's
(`LEARNED`): the shadow-token counts per layer and the calibration of its scores; every request's session
updates them, so the exit layer follows what all requests showed. The probing schedule (which step probes,
which layers are next in rotation) is a request's own (`EarlyExitSession`), counted from its first step.
"""

from __future__ import annotations

import dataclasses

import torch

from skipjack.decoding.proposal import DraftContext, Proposal, Verdict
from skipjack.drafters.base import Drafter, DraftSession, Resources
from skipjack.drafters.layered import Calibrated, DraftHead, draft, prepared, resumable, target
from skipjack.errors import SkipjackError

PROBE_ROWS = 64  # the most hidden states one shadow-token head call takes (a kernel-width pass)


class EarlyExit(Drafter):
    """The draft head and what shadow tokens showed of each exit layer, over all requests (module doc)."""

    name = "del"
    lossless = True
    LEARNED = ("calib", "hits", "seen")

    def __init__(self, exit: int = 0, threshold: float = 0.5, vocab: int = 0, probe_every: int = 4):
        if exit < 0:
            raise SkipjackError(f"del: exit (the draft's last layer, 0 = chosen at run time) must be >= 0 (got {exit})")
        if not 0.0 <= threshold < 1.0:
            raise SkipjackError(
                f"del: threshold (stop drafting below this top-1 probability) must be in [0, 1) (got {threshold})"
            )
        if probe_every < 1:
            raise SkipjackError(f"del: probe_every must be >= 1 (got {probe_every})")
        if vocab < 0:
            raise SkipjackError(f"del: vocab (draft head size, 0 = full) must be >= 0 (got {vocab})")
        self.fixed, self.threshold, self.vocab, self.probe_every = exit, threshold, vocab, probe_every
        self.model, self.head, self.calib = None, None, Calibrated()
        self.hits: list[int] = []  # per layer 0..L-2: shadow tokens equal to the emitted token
        self.seen: list[int] = []  # per layer: shadow tokens judged
        self.chosen: int | None = None  # the exit layer of the last draft (None: not drafting, no layer pays)
        self.worth = 0.0  # its expected tokens per layer of compute, in plain steps

    def prepare(self, resources: Resources) -> None:
        """The draft head (reduced by `Resources.token_counts` with `vocab`) and `exit` checked; nothing timed."""
        self._setup(target(resources, self.name), resources.token_counts)

    def _setup(self, model, counts=None) -> None:
        L = model.num_layers
        if self.fixed and self.fixed >= L - 1:
            raise SkipjackError(f"del: exit must be below the last layer ({L - 1}) of this model (got {self.fixed})")
        self.model = model
        self.head = DraftHead(model, self.vocab, counts)
        self.hits, self.seen = [0] * (L - 1), [0] * (L - 1)
        per_layer = sum(lin.nbytes for lin in model.linears()[:-1]) / L
        self.head_layers = (self.head.linear or model.lm_head).nbytes / per_layer  # the draft head, in layers

    def session(self) -> EarlyExitSession:
        return EarlyExitSession(self)

    def alpha(self, layer: int) -> float:
        """Estimated share of shadow tokens at `layer` that equal the full model's token."""
        L = self.model.num_layers
        return (self.hits[layer] + 2.0 * (layer + 1) / L) / (self.seen[layer] + 2.0)

    def choose(self, budget: int, resume: bool) -> tuple[int, int]:
        """(exit layer, draft length) with the best expected tokens per layer of compute (module doc)."""
        L, H = self.model.num_layers, self.head_layers
        layers = [self.fixed] if self.fixed else range(L - 1)
        best = (0.0, 0, 1)
        for ell in layers:
            a, total, power = self.alpha(ell), 1.0, 1.0
            for k in range(1, max(1, min(budget, 32)) + 1):
                power *= a
                total += power
                draft = (k + 1 if resume else k) * (ell + 1 + H)  # draft passes: layers 0..ell and the head
                cost = (draft + (L - ell - 1 if resume else L) + H) / (L + H)
                best = max(best, (total / cost, -ell, k))
        self.worth = best[0]
        return -best[1], (best[2] if best[0] > 1.0 else 1)

    @property
    def cost_prior(self) -> float:
        """A draft token's cost in plain steps before one is timed: its share of the layers."""
        return (self.chosen + 1) / self.model.num_layers if self.model is not None and self.chosen is not None else 0.0

    def describe(self) -> dict:
        """The exit layer in use and the estimated α per layer, for reports."""
        alpha = [round(self.alpha(i), 3) for i in range(len(self.seen))] if self.model is not None else []
        return {"exit": self.chosen, "value": round(self.worth, 3), "alpha": alpha, "shadow_tokens": sum(self.seen)}

    def learn(self, truth: list[tuple[int, list[int]]], states: list[torch.Tensor]) -> None:
        """Count shadow tokens: `states` [R, D] per layer in `truth` (layer, the emitted tokens they predict)."""
        shadow = self.head.argmax(torch.cat(states))  # [sum R]
        i = 0
        for layer, want in truth:
            got = shadow[i : i + len(want)]
            i += len(want)
            self.seen[layer] += len(want)
            self.hits[layer] += sum(int(a == b) for a, b in zip(got, want))


class EarlyExitSession(DraftSession):
    """One request's drafts: the exit layer its drafter's statistics choose, probes on this request's own
    schedule (every `probe_every` of its steps; layers in rotation), shadow tokens counted into the drafter."""

    def __init__(self, drafter: EarlyExit):
        self.d = drafter
        self.step, self.turn = 0, 0

    def propose(self, ctx: DraftContext) -> Proposal | None:
        d = self.d
        prepared(d.model, ctx, d.name)
        model = d.model
        resume = resumable(model)
        (E, k), self.step = d.choose(ctx.budget, resume), self.step + 1
        probing = self.step % (d.probe_every * (1 if d.worth > 1.0 else 4)) == 0
        d.chosen = E if d.worth > 1.0 or d.fixed else None
        if d.chosen is None and not probing:
            return None  # no exit layer is expected to beat plain decoding: plain steps, probing now and then
        probe = self._probe_layers(k + 1) if probing else []
        low = [p for p in probe if p < E or (resume and p == E)]
        drafted: dict[int, list[torch.Tensor]] = {p: [] for p in low}
        hidden: list[torch.Tensor] = []

        def run(token: int, pos: int) -> torch.Tensor:
            out = model(
                torch.tensor([[token]]), ctx.cache, positions=torch.tensor([pos]), layers=range(E + 1),
                return_hidden=low, logits="none",
            )  # fmt: skip
            for p in low:
                drafted[p].append(out.hidden[p][0])  # [1, D]
            return out.last_hidden  # [1, 1, D]

        sub = dataclasses.replace(ctx, budget=min(ctx.budget, k))
        threshold = d.threshold if d.chosen is not None else 0.0  # a probe-only step: one node, always
        prop, raw = draft(sub, run, d.head, threshold, d.calib, hidden=hidden if resume else None)
        if prop is None:
            return None
        high = tuple(p for p in probe if p not in drafted)
        prop.state = (raw, drafted, high)
        prop.want = high
        if resume:
            prop.resume = (E, torch.cat(hidden[: len(prop) + 1], dim=1))  # [1, 1 + N, D]
        return prop

    def _probe_layers(self, rows: int) -> list[int]:
        """The next layers (rotating over 0..L-2) whose shadow tokens this step measures."""
        n, L1 = max(1, PROBE_ROWS // max(1, rows)), self.d.model.num_layers - 1
        out = [(self.turn + i) % L1 for i in range(min(n, L1))]
        self.turn = (self.turn + len(out)) % L1
        return sorted(out)

    def observe(self, proposal: Proposal, verdict: Verdict) -> None:
        raw, drafted, high = proposal.state
        self.d.calib.learn(proposal, verdict, raw)
        if not verdict.argmax:
            return  # sized down to nothing: no verify rows
        rows = [0] + [c + 1 for c in verdict.path]  # verify rows whose next token is now known
        states, truth = [], []
        for layer in [*drafted, *high]:
            src = drafted.get(layer)
            if src is not None:
                hs = [src[r] for r in rows if r < len(src)]
            elif layer in verdict.hidden:
                hs = [verdict.hidden[layer][r : r + 1] for r in rows]
            else:
                continue
            states.append(torch.cat(hs))  # [R, D]
            truth.append((layer, verdict.tokens[: len(hs)]))
        if states:
            self.d.learn(truth, states)
