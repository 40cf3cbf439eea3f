"""`swift`: on-the-fly self-speculation by skipping sub-layers (SWIFT, Xia et al. 2024, "SWIFT: On-the-Fly
Self-Speculative Decoding for LLM Inference Acceleration").

Draft: the same model with a skip set of attention and/or FFN sub-layers (chosen separately; the first and
last layers are always kept), one token at a time, until the top-1 probability falls below `threshold`
(0.8, as the paper); where it stops, the tree's width follows confidence (`layered.draft`: the `width`
likeliest tokens become leaves).

Skip-set search, with no training, once, in `prepare` (outside any request, reported as load time), on local
text (`Resources.text`: the target's token ids of local text, disjoint from every benchmark prompt). The
search's text is the first `4 x window` tokens of it, prefilled into a cache of the search's own, the last
`window` cached tokens being the scored window; nothing of a request's cache is touched. A candidate set is
scored by the share of its draft's argmax tokens that match the full model's over the window, in one
teacher-forced forward through the skipping model (the cache's keys there are saved and put back): what
greedy verification would accept there.
SWIFT searches random sets at a fixed skip ratio with Bayesian optimisation on that score alone; we
maximise what the set is for, the expected tokens per unit of time, with r the match score and f a draft
token's time in plain steps. f is measured in `prepare`, before a search: the fastest one-token pass with
nothing skipped, with every candidate attention skipped, and with every candidate FFN skipped give a plain
pass's time and each sub-layer's (the layers share one shape), so f counts what bytes alone would miss (the
draft head, the per-sub-layer overhead of a small model's pass); without a measurement (no search ran), f is
the share of a plain step's weight bytes the draft streams:

    value(S) = max_k (1 + r + ... + r^k) / (k f + 1)

Search: (1) one traced full forward over the window gives each sub-layer's cosine similarity between its
input and output; (2) the sets made of the most redundant sub-layers (highest cosine) at skip ratios of
10-60% are scored; (3) seeded local moves from the best (swap a skipped and a kept sub-layer, add one, drop
one) are kept when the value rises, until `search` evaluations or `patience` in a row without gain. The
set found is saved per model (`store`, with `save`); a later `prepare` loads it and refines it with `refine`
more moves on its text (the saved set is re-scored on that text first). With no local text
(`Resources.text` None, as in unit tests) nothing is searched or timed: the saved set if there is one, else
the empty set (no drafting). A user's `skip=` set is used as given: no search, no timing, always drafts.
Where no set's value exceeds 1 (a small model has few redundant sub-layers), `swift` does not draft: plain
steps. A request (`SwiftSession`) only drafts with the set settled in `prepare`: it never times passes,
searches or writes files. What it learns across requests is the calibration of its scores (`LEARNED`).
Deterministic under `seed`.
"""

from __future__ import annotations

import json
import random
import time

import torch

from skipjack import schemas, store
from skipjack.decoding.proposal import DraftContext, Proposal, Verdict
from skipjack.drafters.base import Drafter, DraftSession, Resources
from skipjack.drafters.layered import Calibrated, DraftHead, draft, prepared, target
from skipjack.errors import SkipjackError
from skipjack.models import fingerprint

Sub = tuple[str, int]  # ("attn" | "ffn", layer)
CONTEXT = 3  # windows of local text before the scored one, as context (the search's text is 4 x `window`)


def parse_skip(spec: str) -> frozenset[Sub] | None:
    """'a3+f5+f6' -> {("attn", 3), ("ffn", 5), ("ffn", 6)}; '' -> None (search)."""
    if not spec:
        return None
    out = set()
    for item in str(spec).split("+"):
        item = item.strip()
        if len(item) < 2 or item[0] not in "af" or not item[1:].isdigit():
            raise SkipjackError(
                f"swift: skip={spec!r}: list sub-layers as a<layer> (attention) or f<layer> (FFN), joined by +"
            )
        out.add(("attn" if item[0] == "a" else "ffn", int(item[1:])))
    return frozenset(out)


def value(match: float, share: float, depth: int = 16) -> float:
    """Expected tokens per plain step's time for a draft of per-token acceptance `match` costing `share` of a
    plain step per token, at its best length (module doc)."""
    best, total, power = 1.0, 1.0, 1.0
    for k in range(1, depth + 1):
        power *= match
        total += power
        best = max(best, total / (k * share + 1.0))
    return best


class Swift(Drafter):
    """The skip set, its measured cost, the draft head and the calibration of its scores (module doc)."""

    name = "swift"
    lossless = True
    reads_past_keys = False  # its search runs in `prepare`, on a cache of its own; a draft writes scratch keys only
    LEARNED = ("calib",)

    def __init__(
        self,
        threshold: float = 0.8,
        width: int = 2,
        window: int = 32,
        search: int = 24,
        refine: int = 4,
        patience: int = 8,
        vocab: int = 0,
        seed: int = 0,
        save: bool = True,
        skip: str = "",
    ):
        if not 0.0 <= threshold < 1.0:
            raise SkipjackError(f"swift: threshold must be in [0, 1) (got {threshold})")
        if not 1 <= width <= 8 or window < 4 or search < 1 or refine < 0 or patience < 1:
            raise SkipjackError("swift: need 1 <= width <= 8, window >= 4, search >= 1, refine >= 0, patience >= 1")
        if vocab < 0:
            raise SkipjackError(f"swift: vocab (draft head size, 0 = full) must be >= 0 (got {vocab})")
        self.threshold, self.width, self.window, self.vocab = threshold, width, window, vocab
        self.search, self.refine, self.patience, self.seed, self.save = search, refine, patience, seed, save
        self.given = parse_skip(skip)  # a skip set of the user's: no search, always drafts
        self.model, self.head, self.calib = None, None, Calibrated()
        self.skip: frozenset[Sub] = frozenset()
        self.match, self.evals, self.drafting = 0.0, 0, False
        self.times: tuple[float, float, float] | None = None  # (plain pass, per attention, per FFN) seconds

    # -- one-off work: the set and its cost -----------------------------------------------------------
    def prepare(self, resources: Resources) -> None:
        """Settle the skip set (module doc): the user's; else the saved one refined, or a new search, on local
        text (timed first); with no local text, the saved set or none. Saves what a search found (`save`)."""
        self._setup(target(resources, self.name), resources.token_counts)
        if self.given is None and self.candidates:
            saved = self._load()
            self.skip, self.match = saved if saved else (frozenset(), 0.0)
            evals = self.refine if saved else self.search
            ctx = self.search_text(resources) if evals else None
            if ctx is not None:
                self.timing(ctx)
                self.optimise(ctx, evals, scan=saved is None)
        self.drafting = bool(self.candidates) and self.pays()

    def _setup(self, model, counts=None) -> None:
        """The model's candidates, weight bytes and draft head, the set file's path, and the user's set checked;
        nothing searched, timed or read."""
        self.model = model
        self.head = DraftHead(model, self.vocab, counts)
        self.bytes = {}
        for i, layer in enumerate(model.layers):
            self.bytes[("attn", i)] = layer.wqkv.nbytes + layer.wo.nbytes
            self.bytes[("ffn", i)] = layer.wgu.nbytes + layer.wd.nbytes
        self.total = sum(self.bytes.values()) + model.lm_head.nbytes
        self.head_bytes = model.lm_head.nbytes if self.head.linear is None else self.head.linear.nbytes
        self.candidates = [s for s in self.bytes if 0 < s[1] < model.num_layers - 1]
        self.times, self.evals = None, 0
        key = {"model": fingerprint(model), "window": self.window, "vocab": self.vocab}
        self.path = store.cache_file("swift", key)
        self.skip, self.match = frozenset(), 0.0
        if self.given is not None:
            bad = sorted(self.given - set(self.candidates))
            if bad:
                raise SkipjackError(
                    f"swift: cannot skip {bad}: layers 1..{model.num_layers - 2} only (first and last are kept)"
                )
            self.skip, self.match = self.given, 1.0

    def search_text(self, resources: Resources) -> DraftContext | None:
        """The search's text as a request would hold it: the first `CONTEXT + 1` windows of local text in a cache
        of its own, every token but the last (pending) prefilled; None without local text (or under 5 tokens)."""
        if resources.text is None:
            return None
        ids = [int(t) for t in resources.text()[: (CONTEXT + 1) * self.window + 1]]
        if len(ids) < 5:
            return None
        cache = self.model.make_cache(len(ids) + 1)
        self.model(torch.tensor([ids[:-1]]), cache, logits="none")
        return DraftContext(ids, 1, self.model, cache)

    def share(self, skip: frozenset[Sub]) -> float:
        """A draft token's time with this skip set, in plain steps: measured (`timing`) where it was, else the
        share of a plain step's weight bytes it streams."""
        if self.times is not None:
            full, t_attn, t_ffn = self.times
            gone = sum(t_attn if kind == "attn" else t_ffn for kind, _ in skip)
            return max(0.05, (full - gone) / full)
        kept = sum(b for s, b in self.bytes.items() if s not in skip)
        return (kept + self.head_bytes) / self.total

    def timing(self, ctx: DraftContext, rounds: int = 3) -> None:
        """Measure a draft token's cost (module doc): fastest one-token passes (at the pending position: scratch
        keys) with nothing skipped, with every candidate attention skipped, with every candidate FFN skipped."""
        n, pos = max(1, len(self.candidates) // 2), torch.tensor([ctx.cache.offset])
        layers = sorted({i for _, i in self.candidates})

        def fastest(**kw) -> float:
            best = float("inf")
            for _ in range(rounds):
                t = time.perf_counter()
                h = self.model(torch.tensor([ctx.tokens[-1:]]), ctx.cache, positions=pos, logits="none", **kw)
                self.head.top(h.last_hidden[0])
                best = min(best, time.perf_counter() - t)
            return best

        full = fastest()
        no_attn, no_ffn = fastest(skip_attn=layers), fastest(skip_ffn=layers)
        ctx.cache.rewind(int(pos))  # the passes' keys were scratch
        self.times = (full, max(0.0, full - no_attn) / n, max(0.0, full - no_ffn) / n)

    @property
    def cost_prior(self) -> float:
        """A draft token's cost in plain steps before one is timed (`sizing.DraftCost`)."""
        return self.share(self.skip) if self.model is not None else 0.0

    def pays(self) -> bool:
        """Whether the set in use is expected to beat plain decoding (value > 1)."""
        if self.given is not None:
            return True
        return bool(self.skip) and value(self.match, self.share(self.skip)) > 1.0

    def _load(self) -> tuple[frozenset[Sub], float] | None:
        saved = schemas.read_cache(self.path, schemas.SkipSet)  # None: missing or damaged, searched again
        if saved is None:
            return None
        skip = frozenset((kind, i) for kind, i in saved.skip)
        return (skip, saved.match) if skip <= set(self.candidates) else None

    def _store(self) -> None:
        if self.save:
            d = {"skip": sorted(self.skip), "match": self.match, "evals": self.evals, "share": self.share(self.skip)}
            store.write_atomic(self.path, json.dumps(d))

    # -- scoring on the search's text ------------------------------------------------------------------
    def _window(self, ctx: DraftContext) -> tuple[int, list[int]]:
        """The window's first position and tokens: the last `window` cached tokens."""
        o = ctx.cache.offset
        n = min(self.window, o)
        return o - n, ctx.tokens[o - n : o]

    def _pass(self, ctx: DraftContext, **kw):
        """A teacher-forced forward over the window (its keys put back afterwards)."""
        lo, toks = self._window(ctx)
        saved = ctx.cache.span(lo, ctx.cache.offset)
        try:
            return self.model(torch.tensor([toks]), ctx.cache, positions=torch.arange(lo, lo + len(toks)),
                              logits="none", **kw)  # fmt: skip
        finally:
            ctx.cache.put_span(lo, saved)

    def reference(self, ctx: DraftContext) -> tuple[list[int], list[Sub]]:
        """The full model's argmax after each window token, and the candidate sub-layers, most redundant first
        (highest cosine between a sub-layer's input and output over the window), from one traced pass."""
        out = self._pass(ctx, trace=True)
        cos = {}
        for i, (a, f) in out.trace.items():
            cos[("attn", i)], cos[("ffn", i)] = float(a.mean()), float(f.mean())
        truth = self.model.head(out.last_hidden).argmax(-1)[0].tolist()  # [n]
        return truth, sorted(self.candidates, key=lambda s: (-cos[s], s))

    def score(self, ctx: DraftContext, skip: frozenset[Sub], truth: list[int]) -> float:
        """Share of the skipping draft's argmax tokens over the window that equal the full model's."""
        attn, ffn = [i for k, i in skip if k == "attn"], [i for k, i in skip if k == "ffn"]
        guess = self.head.argmax(self._pass(ctx, skip_attn=attn, skip_ffn=ffn).last_hidden[0])  # [n]
        self.evals += 1
        return sum(int(a == b) for a, b in zip(guess, truth)) / max(1, len(truth))

    def optimise(self, ctx: DraftContext, evals: int, scan: bool) -> None:
        """Search (scan = True: the ratio scan first) or refine the skip set, with up to `evals` scorings."""
        rng = random.Random(f"{self.seed}:{self.evals}")
        truth, order = self.reference(ctx)

        def tried(skip, best):
            r = self.score(ctx, skip, truth)
            v = value(r, self.share(skip))
            return (v, skip, r) if v > best[0] else best

        r0 = self.score(ctx, self.skip, truth)
        best, left = (value(r0, self.share(self.skip)) if self.skip else 0.0, self.skip, r0), evals - 1
        for frac in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6) if scan else ():
            if left > 0:
                best, left = tried(frozenset(order[: round(frac * len(order))]), best), left - 1
        stale = 0
        while left > 0 and stale < self.patience:
            new, left = tried(self._neighbour(best[1], rng), best), left - 1
            stale = 0 if new[1] != best[1] else stale + 1
            best = new
        _, self.skip, self.match = best
        self._store()

    def _neighbour(self, skip: frozenset[Sub], rng: random.Random) -> frozenset[Sub]:
        kept = [s for s in self.candidates if s not in skip]
        gone = sorted(skip)
        move = rng.choice(["swap", "add", "drop"] if gone and kept else (["add"] if kept else ["drop"]))
        if move in ("swap", "drop"):
            skip = skip - {rng.choice(gone)}
        if move in ("swap", "add"):
            skip = skip | {rng.choice(kept)}
        return frozenset(skip)

    # -- requests ---------------------------------------------------------------------------------------
    def session(self) -> SwiftSession:
        return SwiftSession(self)

    def describe(self) -> dict:
        """The skip set in use, for reports."""
        return {
            "skip_attn": sorted(i for k, i in self.skip if k == "attn"),
            "skip_ffn": sorted(i for k, i in self.skip if k == "ffn"),
            "match": round(self.match, 3),
            "share": round(self.share(self.skip), 3) if self.model is not None else None,
            "drafting": self.drafting,
        }


class SwiftSession(DraftSession):
    """One request's drafts with the set its drafter settled in `prepare` (nothing searched or timed here);
    what verification says updates the drafter's calibration."""

    def __init__(self, drafter: Swift):
        self.d = drafter

    def propose(self, ctx: DraftContext) -> Proposal | None:
        d = self.d
        prepared(d.model, ctx, d.name)
        if not d.drafting:
            return None  # no skip set beats plain decoding (or the model is too shallow to skip anything)
        model, cache = d.model, ctx.cache
        attn = [i for k, i in d.skip if k == "attn"]
        ffn = [i for k, i in d.skip if k == "ffn"]

        def run(token: int, pos: int) -> torch.Tensor:
            out = model(torch.tensor([[token]]), cache, positions=torch.tensor([pos]),
                        skip_attn=attn, skip_ffn=ffn, logits="none")  # fmt: skip
            return out.last_hidden  # [1, 1, D]

        prop, raw = draft(ctx, run, d.head, d.threshold, d.calib, d.width)
        if prop is not None:
            prop.state = raw
        return prop

    def observe(self, proposal: Proposal, verdict: Verdict) -> None:
        self.d.calib.learn(proposal, verdict, proposal.state)
