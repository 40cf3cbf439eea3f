"""What `skipjack eval`'s two harnesses share: a continuation's log-probabilities as a method decodes it, and
the names of result files."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch


@torch.inference_mode()
def continuation_logprobs(model, strategy, prompt: list[int], cont: list[int], raw=False, held=None) -> torch.Tensor:
    """Log-probabilities [C, V] of each continuation position: the prompt run by the exact model (as a prompt is
    in decoding; by the strategy where it scores the prompt's last position too, as DoLa does), the
    continuation by `strategy` (a lossy layer strategy, begun afresh; None: the model) in one pass from
    generated index 0, as it decodes. `raw`: a strategy's scores as they are, not normalised (DoLa's code scores
    multiple choice with log q_N - log q_M summed as it is). `held`: a cache holding every prompt token but the
    last, with room for the continuation (copied, not changed: several continuations of one prompt)."""
    if held is None:
        cache, run = model.make_cache(len(prompt) + len(cont) + 1), prompt
    else:
        cache, run = copy.deepcopy(held), prompt[-1:]
    if strategy is not None and strategy.scores_prompt:  # the token after the prompt is the strategy's too
        strategy.prompt_started(model, prompt, len(cont))
        first = strategy.prompt_forward(model, torch.tensor([run]), cache).logits[0]  # [1, V]
    else:
        first = model(torch.tensor([run]), cache, logits="last").logits[0]  # [1, V]
    norm = (lambda x: x.float()) if raw and strategy is not None else (lambda x: torch.log_softmax(x.float(), -1))
    if len(cont) == 1:
        return norm(first)  # [1, V]
    x = torch.tensor([cont[:-1]])  # [1, C-1]
    if strategy is not None:
        strategy.begin(model, len(prompt), len(cont))
        rest = strategy.forward(model, x, cache, 0).logits[0]  # [C-1, V]
    else:
        rest = model(x, cache).logits[0]  # [C-1, V]
    return norm(torch.cat([first, rest]))  # [C, V]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def label(spec: str) -> str:
    """A model's name in a row: a named model's name, a path's last part."""
    p = Path(spec).expanduser()
    return p.name if p.exists() else spec
