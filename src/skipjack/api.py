"""Text-level API over the decode generator: streaming text with stop strings, and a summary of the run.

The CLI, the server and the benchmark call `stream_text` / `complete`; the engine below them works on ids.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from skipjack.cost import CostModel
from skipjack.decode import Prefilled, PromptCache, Step, cost_model, generate
from skipjack.drafters import make_drafter
from skipjack.drafters.base import Drafter
from skipjack.loading import Loaded
from skipjack.sampling import SamplingParams
from skipjack.tokenizer import StreamDecoder


@dataclass
class Result:
    text: str
    tokens: list[int]  # generated ids (stop token excluded)
    new_tokens: int
    prompt_tokens: int
    seconds: float  # generation only (prefill included, model load excluded)
    tokens_per_s: float
    method: str
    mean_accepted: float  # tokens per decoding forward pass: 1 + accepted drafts (1.0 for plain)
    draft_steps: int  # forward passes that verified a draft
    finish: str
    accept_hist: dict[int, int] = field(default_factory=dict)  # accepted drafts per verify step -> count
    forward_passes: int = 0  # decoding forward passes (prefill excluded)
    prefill_seconds: float = 0.0  # time to the first token (prompt forward pass + first pick)
    cached_tokens: int = 0  # prompt tokens not run again: taken from a prefilled prompt or a prompt cache

    def to_json(self) -> dict:
        return asdict(self)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def stream_text(
    loaded: Loaded,
    prompt: list[int],
    params: SamplingParams,
    drafter: Drafter | None = None,
    stop: tuple[str, ...] = (),
    cost: CostModel | None = None,
    prefilled: Prefilled | None = None,
    prompt_cache: PromptCache | None = None,
) -> Iterator[tuple[str, Step]]:
    """Yield (new text, step) pairs. Text never splits a character and never shows part of a stop string."""
    dec = StreamDecoder(loaded.tokenizer, prompt)
    shown = 0
    steps = generate(loaded.model, prompt, params, drafter, cost, prefilled, prompt_cache)
    for step in steps:
        dec.push(step.tokens)
        if step.finish:
            dec.flush()
        text = dec.text
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            step.finish = "stop"
            yield text[shown:cut], step
            steps.close()
            return
        upto = len(text) - (0 if step.finish else _held_back(text, stop))
        if text.endswith("\ufffd") and not step.finish:
            upto = min(upto, len(text) - 1)
        yield text[shown:upto], step
        shown = max(shown, upto)


def complete(
    loaded: Loaded,
    prompt: list[int],
    params: SamplingParams,
    method: str = "plain",
    stop: tuple[str, ...] = (),
    on_text: Callable[[str], None] | None = None,
    drafter: Drafter | None = None,
    cost: CostModel | None = None,
    prefilled: Prefilled | None = None,
    prompt_cache: PromptCache | None = None,
) -> Result:
    """Run one request to the end and summarise it (`prefilled`, `prompt_cache`: see `skipjack.decode`)."""
    drafter = drafter if drafter is not None else make_drafter(method)
    text, tokens, hist = [], [], Counter()
    accepted = passes = drafts = 0
    finish = "length"
    if drafter is not None and cost is None and not drafter.fixed_length:
        cost = cost_model(loaded.model)  # measured once per model, outside the timed region
    t0 = time.perf_counter()
    t_first, cached = None, 0
    for i, (delta, step) in enumerate(
        stream_text(loaded, prompt, params, drafter, stop, cost, prefilled, prompt_cache)
    ):
        text.append(delta)
        tokens.extend(step.tokens)
        if on_text and delta:
            on_text(delta)
        if i == 0:
            t_first, cached = time.perf_counter() - t0, len(prompt) - step.forward_tokens
        else:
            passes += 1
            accepted += step.accepted
        if step.drafted:
            drafts += 1
            hist[step.accepted] += 1
        finish = step.finish or finish
    dt = time.perf_counter() - t0
    return Result(
        text="".join(text),
        tokens=tokens,
        new_tokens=len(tokens),
        prompt_tokens=len(prompt),
        seconds=dt,
        tokens_per_s=len(tokens) / dt if dt > 0 else 0.0,
        method=method,
        mean_accepted=1.0 + accepted / passes if passes else 1.0,
        draft_steps=drafts,
        finish=finish,
        accept_hist=dict(sorted(hist.items())),
        forward_passes=passes,
        prefill_seconds=t_first or 0.0,
        cached_tokens=cached,
    )
