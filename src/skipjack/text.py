"""Text at the edge of decoding: the new text of each step, cut at stop strings, never splitting a character."""

from __future__ import annotations

from collections.abc import Iterator

from skipjack.decoding.sequence import Step
from skipjack.loading.tokenizer import StreamDecoder


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextStream:
    """One request's text, pushed a step at a time: `push` returns the step's new text, cut at the first stop
    string (then the step's finish is "stop"), holding back a suffix that may start one and an unfinished
    multi-byte character."""

    def __init__(self, dec: StreamDecoder, stop: tuple[str, ...]):
        self.dec, self.stop, self.shown = dec, stop, 0

    def push(self, step: Step) -> str:
        self.dec.push(step.tokens)
        if step.finish:
            self.dec.flush()
        text = self.dec.text
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            step.finish = "stop"
            new, self.shown = text[self.shown : cut], cut
            return new
        upto = len(text) - (0 if step.finish else _held_back(text, self.stop))
        if text.endswith("\ufffd") and not step.finish:
            upto = min(upto, len(text) - 1)
        new = text[self.shown : upto]
        self.shown = max(self.shown, upto)
        return new


def texts(steps: Iterator[Step], dec: StreamDecoder, stop: tuple[str, ...]) -> Iterator[tuple[str, Step]]:
    """The steps with their new text (`TextStream`); a stop string ends the generation."""
    ts = TextStream(dec, stop)
    for step in steps:
        yield ts.push(step), step
        if step.finish:
            steps.close()
            return
