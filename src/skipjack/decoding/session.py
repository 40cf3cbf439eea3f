"""How a request starts: the prompt's KV cache, fresh or carried over from earlier requests.

Three starts, one object:
- **fresh** (no session): the request runs its whole prompt in a cache of its own (`prefill`).
- **copy-from** (`Session.prefilled(model, prompt, n)`): the prompt ran once; each request over that same
  prompt (several methods, samples or retries, as llama.cpp's and mlx-lm's prompt caches) decodes from a copy
  of its cache and never changes it.
- **take-over** (`Session()`: a conversation, as llama.cpp's `cache_prompt` and mlx-lm's chat prompt cache):
  after a request the session holds the keys/values of every token that request ran, the prompt and the
  output up to the last token fed back. The next request, whose prompt usually extends the conversation,
  keeps the longest common prefix of the two and runs only the rest: one turn's new message rather than the
  whole history. A request takes the cache over (no copy) and leaves its own state behind; a request that
  fails part way clears it. The kept prefix is exact (the same keys/values); the rest of the prompt runs as
  one chunk after it, so the logits match a fresh prefill to float rounding, as for any chunked prefill. It
  falls back to a full prefill for another model, no common prefix, or a sliding-window layer that has
  already dropped keys the new tokens need.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from skipjack.cache import CachePolicy, KVCache, TrackedCache
from skipjack.errors import SkipjackError
from skipjack.limits import MAX_DRAFT
from skipjack.models import DecoderLM


def check_prompt(model: DecoderLM, prompt: list[int], max_new_tokens: int) -> int:
    """Validate the prompt; return the cache capacity the request needs."""
    ctx = model.config.max_position_embeddings
    if not prompt:
        raise SkipjackError("the prompt is empty")
    vocab = model.embedding.num_embeddings
    if min(prompt) < 0 or max(prompt) >= vocab:
        raise SkipjackError(f"prompt token ids must be in [0, {vocab})")
    if len(prompt) >= ctx:
        raise SkipjackError(f"the prompt has {len(prompt)} tokens but the model's context is {ctx}")
    return min(ctx, len(prompt) + max_new_tokens + MAX_DRAFT + 1)


@dataclass
class Start:
    """A request's starting state: its cache (holding the prompt) and the next-token logits after it."""

    cache: KVCache
    logits: torch.Tensor  # [V] fp32
    ran: int  # prompt tokens this request ran through the model (the rest came from a session)


def prefill(
    model: DecoderLM,
    prompt: list[int],
    max_new_tokens: int,
    cache: KVCache | None = None,
    held: int = 0,
    policy: CachePolicy | None = None,
) -> Start:
    """Run `prompt` once, with a cache sized for requests of up to `max_new_tokens` new tokens (its layers made
    by `policy`, default every key kept); or, given a `cache` that already holds the first `held` prompt tokens
    (and room for the request), run only the rest. The cache is then settled (a policy may compress it)."""
    if cache is None:
        cache, held = model.make_cache(check_prompt(model, prompt, max_new_tokens), policy=policy), 0
    chunk, ran = cache.policy.prompt_chunk() or len(prompt), len(prompt) - held
    while len(prompt) - held > chunk:  # a policy that bounds the prompt's memory: compress after each part
        model(torch.tensor([prompt[held : held + chunk]]), cache, logits="none")
        held += chunk
        cache.policy.compress(cache)
    logits = model(torch.tensor([prompt[held:]]), cache, logits="last").logits[0, -1]  # [V]
    cache.settle()
    return Start(cache, logits, ran)


class Session:
    """A KV cache carried between requests: a conversation's (`Session()`) or a prefilled prompt's
    (`Session.prefilled`). See the module docstring."""

    def __init__(self) -> None:
        self.model: DecoderLM | None = None
        self.held = TrackedCache()  # the cache and the tokens whose keys/values it holds, in order
        self.logits: torch.Tensor | None = None  # copy-from only: [V] after `tokens`
        self.frozen = False  # copy-from: requests copy the cache and leave it as it was

    @property
    def tokens(self) -> list[int]:
        return self.held.tokens

    @tokens.setter
    def tokens(self, tokens: list[int]) -> None:
        self.held.tokens = list(tokens)

    @property
    def cache(self) -> KVCache | None:
        return self.held.cache

    @cache.setter
    def cache(self, cache: KVCache | None) -> None:
        self.held.cache = cache

    @classmethod
    def prefilled(cls, model: DecoderLM, prompt: list[int], max_new_tokens: int) -> Session:
        """Run `prompt` once, for requests over it of up to `max_new_tokens` new tokens each."""
        s, start = cls(), prefill(model, prompt, max_new_tokens)
        s.model, s.tokens, s.cache, s.logits, s.frozen = model, list(prompt), start.cache, start.logits, True
        return s

    def clear(self) -> None:
        self.model, self.held, self.logits = None, TrackedCache(), None

    def start(self, model: DecoderLM, prompt: list[int], max_new_tokens: int) -> Start:
        """`prompt` prefilled for a request, reusing what this session holds."""
        need = check_prompt(model, prompt, max_new_tokens)
        if self.frozen:
            return self._copy(model, prompt, need)
        held, same = self.held, self.model is model
        self.clear()  # taken over by this request
        n = held.common(prompt[:-1]) if same else 0  # the last token must run
        if n == 0 or not held.cache.resumable(n):
            return prefill(model, prompt, max_new_tokens)
        held.cut(n)
        longest, cap = model.config.max_position_embeddings, held.cache.capacity
        # grown geometrically: a long conversation is copied O(log n) times
        held.fit(need, lambda need: model.make_cache(min(longest, max(need, 2 * cap))))
        return prefill(model, prompt, max_new_tokens, held.cache, n)

    def _copy(self, model: DecoderLM, prompt: list[int], need: int) -> Start:
        if self.model is not model or self.tokens != list(prompt):
            raise SkipjackError("the prefilled prompt is not this request's prompt")
        if self.cache.capacity < need:
            raise SkipjackError(f"the prefilled cache holds {self.cache.capacity} positions; this request needs {need}")
        return Start(copy.deepcopy(self.cache), self.logits, 0)

    def end(self, model: DecoderLM, cache: KVCache, ctx: list[int], intact: bool) -> None:
        """A request over this session finished (`intact`: its cache is whole, so a conversation keeps it;
        a forward that stopped half way through the layers leaves it broken, and the session is cleared).
        Position i holds ctx[i] for every i below both the cache's offset and len(ctx): accepted drafts are
        emitted tokens, and a stop or length cut only shortens the tail."""
        if self.frozen:
            return
        if not intact:
            self.clear()
            return
        self.model, self.held = model, TrackedCache.after(cache, ctx)
