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
    return Prefill(model, prompt, max_new_tokens, cache, held, policy).run()


class Prefill:
    """A prompt's forward pass in parts (`run(n)`: at most n more tokens), so that a server can run a joining
    prompt in chunks between its running requests' steps (chunked prefill) and not stall them. Every part
    writes the cache as the whole prompt would, in its fixed-size kernel chunks; the last part gives the
    logits after the prompt (`Start`)."""

    def __init__(self, model, prompt, max_new_tokens, cache=None, held=0, policy=None, done: Start | None = None):
        if cache is None and done is None:
            cache, held = model.make_cache(check_prompt(model, prompt, max_new_tokens), policy=policy), 0
        self.model, self.prompt, self.cache, self.held, self.start = model, prompt, cache, held, done
        self.ran = 0
        self.last = None  # runs the final part (ids [1, T], cache) -> logits [1, T', V]: a strategy's own (DoLa)

    @classmethod
    def finished(cls, start: Start) -> Prefill:
        return cls(None, [], 0, done=start)

    @property
    def left(self) -> int:
        """Prompt tokens still to run."""
        return 0 if self.start is not None else len(self.prompt) - self.held

    def run(self, n: int | None = None) -> Start | None:
        """Run at most `n` more prompt tokens (None: all of them); the `Start` once the whole prompt has run.
        Without `n` the parts are those of a plain prefill: a cache policy's `prompt_chunk`s (compressing after
        each), then the rest with the logits. With `n`, parts of n tokens (a policy's own chunk wins)."""
        if self.start is not None:
            return self.start
        cache, prompt = self.cache, self.prompt
        policy_chunk = cache.policy.prompt_chunk()
        step = policy_chunk or (len(prompt) if n is None else max(1, n))
        budget = len(prompt) if n is None else max(step, n)
        while self.left > step and budget >= step:
            self.model(torch.tensor([prompt[self.held : self.held + step]]), cache, logits="none")
            self.held, self.ran, budget = self.held + step, self.ran + step, budget - step
            if policy_chunk:
                cache.policy.compress(cache)
        if self.left > budget:
            return None  # more next time
        ids = torch.tensor([prompt[self.held :]])  # [1, T]
        out = self.model(ids, cache, logits="last") if self.last is None else self.last(ids, cache)
        logits = out.logits[0, -1]  # [V]
        self.ran, self.held = self.ran + self.left, len(prompt)
        cache.settle()
        self.start = Start(cache, logits, self.ran)
        return self.start


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
        return self.begin(model, prompt, max_new_tokens).run()

    def begin(self, model: DecoderLM, prompt: list[int], max_new_tokens: int) -> Prefill:
        """`start`, as a prefill still to run (in parts, for a chunked prefill)."""
        need = check_prompt(model, prompt, max_new_tokens)
        if self.frozen:
            return Prefill.finished(self._copy(model, prompt, need))
        held, same = self.held, self.model is model
        self.clear()  # taken over by this request
        n = held.common(prompt[:-1]) if same else 0  # the last token must run
        if n == 0 or not held.cache.resumable(n):
            return Prefill(model, prompt, max_new_tokens)
        held.cut(n)
        longest, cap = model.config.max_position_embeddings, held.cache.capacity
        # grown geometrically: a long conversation is copied O(log n) times
        held.fit(need, lambda need: model.make_cache(min(longest, max(need, 2 * cap))))
        return Prefill(model, prompt, max_new_tokens, held.cache, n)

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
