"""Lossy per-layer strategies: how a plain decoding step runs the model's layers (skip some FFNs, some whole
layers, or the lower layers of late tokens). They trade quality for speed, so every one is `lossless = False`
and is labelled so wherever a method is shown (CLI, `--json`, API, bench); `skipjack eval` measures the price.

A strategy sees the step's input tokens and their index among the generated tokens (0: the first token after
the prompt) and runs the forward itself (`forward`). The prompt is always run with every layer (its keys are
exact); a strategy only changes the steps after it. The decode loop uses a strategy for plain steps only (no
drafter), and `skipjack eval` runs the same `forward` teacher-forced over a continuation, so what is measured
is what decoding does.
"""

from __future__ import annotations

import torch

from skipjack.errors import SkipjackError


class Strategy:
    name = "strategy"
    lossless = False
    repetition_penalty = 1.0  # what a request that leaves its own at 1 decodes with (DoLa's paper pairs it with 1.2)

    def begin(self, model, prompt_len: int, max_new: int) -> None:
        """A request starts: `prompt_len` tokens are cached; at most `max_new` will be generated."""
        self.model, self.prompt_len, self.max_new = model, prompt_len, max(1, max_new)
        self.tokens = self.ffn_run = self.ffn_skipped = self.layers_run = 0

    def forward(self, model, ids: torch.Tensor, cache, index: int):
        """Run the new tokens `ids` [1, T] (generated indices index .. index + T - 1) after the cache's keys;
        returns the model's `ForwardOut` with logits for every position."""
        raise NotImplementedError

    scores_prompt = False  # whether the token after the prompt is the strategy's too (`prompt_forward`)

    def prompt_started(self, model, prompt: list[int], max_new: int) -> None:
        """Before a request's prompt runs, where `scores_prompt` (LOL's refocus context starts here)."""

    def prompt_forward(self, model, ids: torch.Tensor, cache):
        """The prompt's final part `ids` [1, T] after the cache's keys, every layer run, where `scores_prompt`:
        returns the model's `ForwardOut` whose last position's logits are the strategy's scores."""
        raise NotImplementedError

    def keeps_cache_whole(self) -> bool:
        """Whether every layer's keys are written for every token (a conversation can go on from the cache)."""
        return True

    def count(self, tokens: int, layers: int, ffn_skipped: int) -> None:
        """Book-keeping for `stats`: `tokens` tokens ran `layers` layers each, `ffn_skipped` FFNs in all skipped."""
        self.tokens += tokens
        self.layers_run += tokens * layers
        self.ffn_skipped += ffn_skipped
        self.ffn_run += tokens * layers - ffn_skipped

    def stats(self) -> dict:
        """What the strategy skipped over the tokens it ran: shares of all layers' and FFNs' work."""
        full = max(1, self.tokens * self.model.num_layers)
        return {
            "tokens": self.tokens,
            "layers_skipped_share": 1 - self.layers_run / full,
            "ffn_skipped_share": 1 - self.ffn_run / full,
        }


def fraction(name: str, key: str, value, top_open: bool = True) -> float:
    """A strategy option that is a share in [0, 1) (or [0, 1] when not `top_open`)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value and value == value
    ok = ok and (value < 1 if top_open else value <= 1)
    if not ok:
        rng = "[0, 1)" if top_open else "[0, 1]"
        raise SkipjackError(f"{name}: {key} must be a number in {rng} (got {value!r})")
    return float(value)


def count(name: str, key: str, value, low: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise SkipjackError(f"{name}: {key} must be an integer >= {low} (got {value!r})")
    return value
