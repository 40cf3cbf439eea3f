"""Continuous batching on an engine, as the server's worker runs it: requests join and leave between steps,
optionally with chunked prefill (a joining prompt runs in parts between the batch's steps)."""

from __future__ import annotations

from skipjack.decoding.batch import Batch
from skipjack.decoding.plan import Plan
from skipjack.decoding.sequence import Sequence, Step
from skipjack.errors import SkipjackError
from skipjack.loading.tokenizer import StreamDecoder
from skipjack.text import TextStream


class Handle:
    """One request in a `BatchRunner`: its sequence, its text, its plan."""

    def __init__(self, request, seq: Sequence, text: TextStream, plan: Plan):
        self.request, self.seq, self.text, self.plan = request, seq, text, plan
        self.first: Step | None = None
        self.first_text = ""


class BatchRunner:
    """Requests decoded together on one engine (the server's worker uses it). `add` prefills a request alone and
    returns its handle (its first step and text on it); `step` runs one batched step of every live request and
    returns (handle, new text, step) for each; `drop` ends one between steps. Each step holds the engine's lock.
    The sequences of one method draft through sessions of its one drafter, as llama.cpp's sequence ids."""

    def __init__(self, engine, chunk: int | None = None):
        """`chunk`: run a joining prompt `chunk` tokens per step, between the batch's steps (chunked prefill: the
        running requests keep stepping); its first step comes out of `step`. None: `add` runs it whole."""
        self.engine, self.batch, self.handles = engine, Batch(engine.model, cost=engine.batch_cost), {}
        self.chunk, self.waiting = chunk, []

    def busy(self) -> bool:
        return bool(self.batch.live or self.waiting)

    def add(self, request) -> Handle:
        e = self.engine
        if len(self.batch.live) + len(self.waiting) >= self.batch.rows:
            raise SkipjackError(f"the batch is full ({self.batch.rows} sequences)")
        plan = e.plan(request)
        with e.lock:
            seq = Sequence(e.model, plan, request.prompt, request.params, chunked=self.chunk is not None)
            h = Handle(request, seq, TextStream(StreamDecoder(e.tokenizer, request.prompt), request.stop), plan)
            self.handles[id(seq)] = h
            if self.chunk is not None:
                self.waiting.append(h)
                return h
            h.first = self.batch.add(seq)
        self._first(h)
        return h

    def _first(self, h: Handle) -> None:
        h.first_text = h.text.push(h.first)
        if h.first.finish:
            self.handles.pop(id(h.seq), None)

    def step(self) -> list[tuple[Handle, str, Step]]:
        """One chunk of the oldest waiting prompt (its first step when it has run) and one step of the batch."""
        out = []
        if self.waiting:
            h = self.waiting[0]
            with self.engine.lock:
                if h.seq.prefill(self.chunk):
                    self.waiting.pop(0)
                    h.first = self.batch.add(h.seq)
            if h.first is not None:
                self._first(h)
                out.append((h, h.first_text, h.first))
        if self.batch.live:
            with self.engine.lock:
                steps = self.batch.step()
            for seq, step in steps:
                h = self.handles[id(seq)]
                out.append((h, h.text.push(step), step))
                if step.finish:
                    self.drop(h)
        return out

    def drop(self, h: Handle) -> None:
        if h in self.waiting:
            self.waiting.remove(h)
            h.seq.close()
        else:
            self.batch.drop(h.seq)
        self.handles.pop(id(h.seq), None)
