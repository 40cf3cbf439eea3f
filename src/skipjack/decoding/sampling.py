"""Sampling parameters and the logits -> probabilities transform shared by plain decoding and verification.

The same `probs()` is applied to the target model's logits in plain sampling and in speculative
verification (and to a drafter's logits when it has them), so speculative sampling preserves exactly the
distribution of plain sampling with these settings. Order: logit bias, repetition penalty, frequency and
presence penalties, the `min_tokens` mask (as vLLM), a grammar's mask (`constraint`), then temperature, top-k,
top-p, min-p.

The adjustments before the warpers depend on the request's history (`adjust`: the prompt's and the output's
tokens, the output's counts, how many tokens were generated). Verification computes each row's history along
that row's own path (the context plus the draft tokens up to the node), so it stays exact under them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from skipjack import validate
from skipjack.errors import SkipjackError

MAX_LOGPROBS = 20  # as OpenAI's top_logprobs
MAX_NEW_TOKENS = 1 << 24  # far above any context here; a larger request is a mistake, not a long answer


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # in (0, 1]
    min_p: float = 0.0  # in [0, 1)
    repetition_penalty: float = 1.0  # > 0; 1 = off (CTRL-style, over prompt + output)
    seed: int | None = None
    max_new_tokens: int = 256
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    logprobs: int | None = None  # report each token's logprob and this many top alternatives (0-20); None: off
    logit_bias: dict[int, float] | None = None  # token id -> bias in [-100, 100] added to its logit (OpenAI)
    frequency_penalty: float = 0.0  # in [-2, 2]: minus count * this, counting the generated tokens (OpenAI)
    presence_penalty: float = 0.0  # in [-2, 2]: minus this for every token generated at least once (OpenAI)
    ignore_eos: bool = False  # stop tokens do not end the request (they are emitted as any token)
    min_tokens: int = 0  # stop tokens are masked until this many tokens were generated (vLLM)

    def __post_init__(self):
        """Checked once, at the boundary (`skipjack.validate`): types, finite values, ranges."""
        self.temperature = validate.number("temperature", self.temperature, 0.0, math.inf)
        self.top_k = validate.integer("top-k", self.top_k, 0)
        self.top_p = validate.number("top-p", self.top_p, 0.0, 1.0, lo_open=True)
        self.min_p = validate.number("min-p", self.min_p, 0.0, 1.0, hi_open=True)
        self.repetition_penalty = validate.number(
            "repetition penalty", self.repetition_penalty, 0.0, math.inf, lo_open=True
        )
        if self.seed is not None:
            validate.integer("seed", self.seed, 0, 2**64 - 1)
        validate.integer("max new tokens", self.max_new_tokens, 1, MAX_NEW_TOKENS)
        if not isinstance(self.stop_token_ids, frozenset | set | list | tuple):
            raise SkipjackError("stop token ids must be a set of token ids")
        for t in self.stop_token_ids:
            validate.integer("a stop token id", t, 0)
        self.stop_token_ids = frozenset(self.stop_token_ids)
        if self.logprobs is not None:
            validate.integer("logprobs (top alternatives)", self.logprobs, 0, MAX_LOGPROBS)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise SkipjackError(
                    f"logit bias must be a map of token ids to biases (got {type(self.logit_bias).__name__})"
                )
            self.logit_bias = {
                validate.integer("a logit bias token id", t, 0): validate.number(
                    f"logit bias of token {t}", b, -100.0, 100.0
                )
                for t, b in self.logit_bias.items()
            }
        self.frequency_penalty = validate.number("frequency penalty", self.frequency_penalty, -2.0, 2.0)
        self.presence_penalty = validate.number("presence penalty", self.presence_penalty, -2.0, 2.0)
        if not isinstance(self.ignore_eos, bool):
            raise SkipjackError(f"ignore_eos must be true or false (got {self.ignore_eos!r:.40})")
        validate.integer("min tokens", self.min_tokens, 0, self.max_new_tokens)

    def check_vocab(self, vocab: int) -> None:
        """The token ids in the settings exist in a model of `vocab` tokens (a one-line error if not)."""
        for t in self.logit_bias or ():
            if t >= vocab:
                raise SkipjackError(f"logit bias token id {t} is outside the vocabulary [0, {vocab})")

    @property
    def adjusted(self) -> bool:
        """Whether logits are adjusted by the history or a bias before the warpers (see `adjust`)."""
        return bool(
            self.logit_bias
            or self.repetition_penalty != 1.0
            or self.frequency_penalty
            or self.presence_penalty
            or self.masked
        )

    @property
    def masked(self) -> bool:
        """Whether stop tokens are masked for a while (`min_tokens`; with `ignore_eos` nothing stops)."""
        return self.min_tokens > 0 and bool(self.stop_token_ids) and not self.ignore_eos

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL repetition penalty: logits [N, V] of tokens marked in `seen` [N, V] are divided (if > 0) or
    multiplied (if < 0) by `penalty`."""
    if penalty == 1.0:
        return logits
    pen = torch.where(logits > 0, logits / penalty, logits * penalty)
    big = torch.finfo(logits.dtype).max  # an extreme penalty overflows: clamp, so the order still decides
    return torch.where(seen, pen.clamp(-big, big), logits)


def adjust(
    logits: torch.Tensor,
    p: SamplingParams,
    seen: torch.Tensor | None,
    counts: torch.Tensor | None,
    generated: torch.Tensor,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [N, V] adjusted for each row's history: `seen` [N, V] bool (prompt + output, for the
    repetition penalty), `counts` [N, V] (each token's count in the output, for the frequency and presence
    penalties), `generated` [N] (tokens generated before the row's token, for `min_tokens`), `allowed` [N, V]
    bool (a grammar's mask after the row's history; None: no grammar). Elementwise per row, so a row gets the
    same values alone (plain decoding) or in a verify forward."""
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
        bias = torch.tensor(list(p.logit_bias.values()), dtype=torch.float64).to(logits.dtype)
        logits = logits.index_add(-1, ids, bias.expand(logits.shape[0], -1))
    if seen is not None:
        logits = penalize(logits, seen, p.repetition_penalty)
    if counts is not None and (p.frequency_penalty or p.presence_penalty):
        c = counts.to(logits.dtype)
        logits = logits - c * p.frequency_penalty - (c > 0).to(logits.dtype) * p.presence_penalty
    if p.masked:
        V = logits.shape[-1]
        stops = torch.tensor(sorted(t for t in p.stop_token_ids if t < V), dtype=torch.long)
        early = (generated < p.min_tokens)[:, None]  # [N, 1]
        mask = torch.zeros_like(logits, dtype=torch.bool)
        mask[:, stops] = True
        logits = logits.masked_fill(mask & early, float("-inf"))
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return logits


def probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Warped next-token distribution [N, V] from logits [N, V] (penalty already applied). For greedy
    settings this is one-hot at the argmax."""
    if p.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    # Shifted by the max before dividing: at a tiny temperature the gaps become -inf (never NaN) and the
    # distribution tends to greedy's argmax, as it should.
    # A temperature below the dtype's smallest normal number is that number (it would round to 0 and divide
    # 0 by 0): the same limit.
    t = max(p.temperature, torch.finfo(logits.dtype).tiny)
    x = (logits - logits.max(-1, keepdim=True).values) / t  # [N, V], <= 0
    if p.top_k and p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k, dim=-1).values[..., -1:]  # [N, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        srt, idx = torch.sort(x, dim=-1, descending=True)  # [N, V]
        cum = srt.softmax(-1).cumsum(-1)
        drop = (cum - srt.softmax(-1)) >= p.top_p  # keep the smallest prefix reaching top_p
        drop[..., 0] = False  # the top token always stays (a top_p below fp32's range rounds to 0)
        x = x.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    pr = x.softmax(-1)
    if p.min_p > 0:
        pr = pr.masked_fill(pr < p.min_p * pr.max(-1, keepdim=True).values, 0.0)
        pr = pr / pr.sum(-1, keepdim=True)
    return pr


def sample(pr: torch.Tensor, gen: torch.Generator | None) -> int:
    """Draw one token from a distribution [V]."""
    return int(torch.multinomial(pr, 1, generator=gen))


class Sampler:
    """Picks one request's tokens: its sampling settings, its seeded generator, and the request's history
    (`adjust`): the tokens seen so far (prompt + output, for the repetition penalty), the output's token counts
    (frequency and presence penalties), how many tokens were generated (`min_tokens`)."""

    def __init__(self, params: SamplingParams, prompt: list[int], vocab: int, constraint=None):
        params.check_vocab(vocab)
        self.params, self.constraint = params, constraint  # constraint: a grammar's state (`constraint`)
        self.gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.seen: torch.Tensor | None = None  # [V] bool, only with a repetition penalty
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab, dtype=torch.bool)
            self.seen[torch.tensor(prompt)] = True
        self.counts: torch.Tensor | None = None  # [V] float64, only with a frequency or presence penalty
        if params.frequency_penalty or params.presence_penalty:
            self.counts = torch.zeros(vocab, dtype=torch.float64)
        self.generated = 0

    def pick(self, logits: torch.Tensor, argmax: int | None = None) -> int:
        """The next token after logits [V] (`argmax`: theirs, where the forward computed it)."""
        allowed = None if self.constraint is None else self.constraint.allowed()[None]  # [1, V]
        if self.params.adjusted or allowed is not None:
            seen = None if self.seen is None else self.seen[None]
            counts = None if self.counts is None else self.counts[None]
            logits = adjust(logits[None], self.params, seen, counts, torch.tensor([self.generated]), allowed)[0]
            argmax = None
        if self.params.greedy:
            return int(logits.argmax()) if argmax is None else argmax
        return sample(probs(logits[None], self.params)[0], self.gen)

    def saw(self, tokens: list[int]) -> None:
        """Tokens were emitted: the history (and a grammar's state) now holds them too."""
        self.generated += len(tokens)
        if self.constraint is not None:
            self.constraint.advance(tokens)
        if self.seen is not None and tokens:
            self.seen[torch.tensor(tokens)] = True
        if self.counts is not None and tokens:
            self.counts.index_add_(0, torch.tensor(tokens), torch.ones(len(tokens), dtype=torch.float64))
