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

from skipjack.decoding.proposal import DraftContext, Proposal, Verdict, common_prefix
from skipjack.drafters.layered import Calibrated, DraftHead, SharesModels, draft
from skipjack.errors import SkipjackError
from skipjack.loading import load as loading

GROW = 1024  # the draft cache grows by at least this many positions at a time


class DraftModel(SharesModels):
    name = "draft"
    lossless = True

    def __init__(
        self, model="", threshold: float = 0.3, width: int = 1, vocab: int = 0, dtype: str = "",
        shared: dict | None = None,
    ):  # fmt: skip
        if not model:
            raise SkipjackError("draft: name the draft model, for example --method draft:model=qwen2.5-coder-0.5b")
        if not 0.0 <= threshold < 1.0 or not 1 <= width <= 8:
            raise SkipjackError(f"draft: need 0 <= threshold < 1 and 1 <= width <= 8 (got {threshold}, {width})")
        shared = shared if shared is not None else {}
        target = shared.get("target")  # the engine's Loaded
        if isinstance(model, str):
            self.loaded = loading.load(model, dtype or (target.dtype if target is not None else "auto"))
            if target is not None:
                check_tokenizers(target, self.loaded)
            model = self.loaded.model
        self.model, self.threshold, self.width = model, threshold, width  # `model`: a DecoderLM from the API
        self.head = DraftHead(self.model, vocab, shared.get("token_counts"))
        big = target.model if target is not None else None
        # a draft token's cost before one is timed: the two models' streamed weight bytes
        self.cost_prior = _bytes(self.model) / _bytes(big) if big is not None else 0.0
        self.calib = Calibrated()
        self.cache, self.held = None, []

    def begin(self, prompt: list[int]) -> None:
        self.cache, self.held = None, []  # a new request: its own draft cache

    def end(self) -> None:
        self.cache, self.held = None, []

    def _room(self, need: int) -> None:
        """A draft cache for at least `need` positions (grown, keys kept)."""
        limit = self.model.config.max_position_embeddings
        if need > limit:
            raise SkipjackError(f"draft: the context ({need}) exceeds the draft model's ({limit})")
        if self.cache is None or need > self.cache.capacity:
            fresh = self.model.make_cache(min(limit, max(need + GROW, 2 * need)))
            self.cache = fresh if self.cache is None else self.cache.moved(fresh)

    def sync(self, tokens: list[int]) -> None:
        """Bring the draft cache to hold tokens[:-1] (keep the common prefix, run the rest in one pass)."""
        keep = min(common_prefix(self.held, tokens), len(tokens) - 1)
        self._room(len(tokens) + 66)
        self.cache.rewind(keep)
        del self.held[keep:]
        missing = tokens[keep:-1]
        if missing:
            self.model(
                torch.tensor([missing]), self.cache, positions=torch.arange(keep, keep + len(missing)), logits="none"
            )
            self.held.extend(missing)

    def propose(self, ctx: DraftContext) -> Proposal | None:
        if max(ctx.tokens) >= self.model.embedding.num_embeddings:
            return None  # a token the draft model has no embedding for (a larger target vocabulary)
        self.sync(ctx.tokens)
        self._room(len(ctx.tokens) + ctx.budget + 2)

        def run(token: int, pos: int) -> torch.Tensor:
            out = self.model(torch.tensor([[token]]), self.cache, positions=torch.tensor([pos]), logits="none")
            self.held.append(token)
            return out.last_hidden  # [1, 1, D]

        own = dataclasses.replace(ctx, model=self.model, cache=self.cache)
        prop, raw = draft(own, run, self.head, self.threshold, self.calib, self.width)
        if prop is not None:
            prop.state = raw
        return prop

    def observe(self, proposal: Proposal, verdict: Verdict) -> None:
        self.calib.learn(proposal, verdict, proposal.state)


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
