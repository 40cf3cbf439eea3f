"""`draft:model=NAME`: classic speculative decoding with a smaller model of the same tokenizer (Leviathan et al.
2023; Chen et al. 2023), the baseline every peer has (HF `assistant_model`, llama.cpp `-md`, vLLM's draft
model).

The draft model keeps its own KV cache and the tokens it holds. Each step it keeps the longest common
prefix of those and the target's context (so it is rolled back with the target: rejected drafts go), runs
the tokens it is missing (usually the last accepted ones and the bonus token) in one pass, then drafts one
token at a time from the pending token (`layered.draft`: greedy, stops below `threshold`, when one more node
cannot pay, or at the budget; `width` > 1: leaves where it stops). The draft model is loaded once per method,
in the target's dtype (`dtype` overrides), and must share the target's tokenizer: same vocabulary, same ids.
"""

from __future__ import annotations

import dataclasses

import torch

from skipjack.cache import TrackedCache
from skipjack.decoding.proposal import DraftContext, Proposal, Verdict
from skipjack.drafters.base import Drafter, DraftSession, Resources
from skipjack.drafters.layered import Calibrated, DraftHead, draft
from skipjack.errors import SkipjackError
from skipjack.loading import load as loading

GROW = 1024  # the draft cache grows by at least this many positions at a time


class DraftModel(Drafter):
    """The options, the draft model and its head (`prepare`), and the calibration learned across requests;
    each request's draft cache lives in its `DraftModelSession`."""

    name = "draft"
    lossless = True
    reads_past_keys = False  # its own model, its own cache: the target's cache is never read
    owns_cache = True
    LEARNED = ("calib",)

    def __init__(self, model="", threshold: float = 0.3, width: int = 1, vocab: int = 0, dtype: str = ""):
        if not model:
            raise SkipjackError("draft: name the draft model, for example --method draft:model=qwen2.5-coder-0.5b")
        if not 0.0 <= threshold < 1.0 or not 1 <= width <= 8:
            raise SkipjackError(f"draft: need 0 <= threshold < 1 and 1 <= width <= 8 (got {threshold}, {width})")
        if vocab < 0:
            raise SkipjackError(f"draft: vocab (draft head size, 0 = full) must be >= 0 (got {vocab})")
        if dtype and dtype not in loading.CHOICES:
            raise SkipjackError(f"draft: unknown dtype {dtype!r}; choose one of {', '.join(loading.CHOICES)}")
        self.source = model  # a name, path or hub id (loaded by `prepare`), or a DecoderLM from the API
        self.threshold, self.width, self.vocab, self.dtype = threshold, width, vocab, dtype
        self.model = self.head = self.loaded = None
        self.prior = 0.0
        self.calib = Calibrated()

    def prepare(self, resources: Resources) -> None:
        """Load the draft model (in the target's dtype unless `dtype` says), check that it shares the target's
        tokenizer, and make its draft head."""
        target = resources.target  # the engine's Loaded (None from the API)
        model = self.source
        if isinstance(model, str):
            self.loaded = loading.load(model, self.dtype or (target.dtype if target is not None else "auto"))
            if target is not None:
                check_tokenizers(target, self.loaded)
            model = self.loaded.model
        self.model = model
        self.head = DraftHead(model, self.vocab, resources.token_counts)
        big = resources.model if resources.model is not None else target.model if target is not None else None
        # a draft token's cost before one is timed: the two models' streamed weight bytes
        self.prior = _bytes(model) / _bytes(big) if big is not None else 0.0

    @property
    def cost_prior(self) -> float:
        return self.prior

    def session(self) -> DraftModelSession:
        if self.model is None:
            raise SkipjackError("draft: the drafter is not prepared (`prepare(resources)` loads the draft model)")
        return DraftModelSession(self)


class DraftModelSession(DraftSession):
    """One request: the draft model's cache and the tokens whose keys it holds (`cache.TrackedCache`)."""

    def __init__(self, drafter: DraftModel):
        self.drafter = drafter
        self.held = TrackedCache()

    def begin(self, prompt: list[int]) -> None:
        self.held = TrackedCache()  # a new request: its own draft cache

    def end(self) -> None:
        self.held.clear()

    def _room(self, need: int) -> None:
        """A draft cache for at least `need` positions (grown, keys kept)."""
        model = self.drafter.model
        limit = model.config.max_position_embeddings
        if need > limit:
            raise SkipjackError(f"draft: the context ({need}) exceeds the draft model's ({limit})")
        self.held.fit(need, lambda need: model.make_cache(min(limit, max(need + GROW, 2 * need))))

    def sync(self, tokens: list[int]) -> None:
        """Bring the draft cache to hold tokens[:-1] (keep the common prefix, run the rest in one pass)."""
        self._room(len(tokens) + 66)
        missing = self.held.sync(tokens[:-1])
        if missing:
            keep = len(self.held)
            positions = torch.arange(keep, keep + len(missing))
            self.drafter.model(torch.tensor([missing]), self.held.cache, positions=positions, logits="none")
            self.held.extend(missing)

    def propose(self, ctx: DraftContext) -> Proposal | None:
        d = self.drafter
        if max(ctx.tokens) >= d.model.embedding.num_embeddings:
            return None  # a token the draft model has no embedding for (a larger target vocabulary)
        self.sync(ctx.tokens)
        self._room(len(ctx.tokens) + ctx.budget + 2)
        held = self.held

        def run(token: int, pos: int) -> torch.Tensor:
            out = d.model(torch.tensor([[token]]), held.cache, positions=torch.tensor([pos]), logits="none")
            held.extend([token])
            return out.last_hidden  # [1, 1, D]

        own = dataclasses.replace(ctx, model=d.model, cache=held.cache)
        prop, raw = draft(own, run, d.head, d.threshold, d.calib, d.width)
        if prop is not None:
            prop.state = raw
        return prop

    def observe(self, proposal: Proposal, verdict: Verdict) -> None:
        self.drafter.calib.learn(proposal, verdict, proposal.state)


def _bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def check_tokenizers(target, drafted) -> None:
    """One line when the draft model's tokenizer is not the target's (same tokens, same ids)."""
    a, b = target.tokenizer.hf.get_vocab(), drafted.tokenizer.hf.get_vocab()
    if a != b:
        raise SkipjackError(
            f"draft: {drafted.name} does not share {target.name}'s tokenizer "
            f"({len(b)} vs {len(a)} tokens, {sum(a.get(t) != i for t, i in b.items())} differ)"
        )
