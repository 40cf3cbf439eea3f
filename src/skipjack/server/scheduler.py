"""The server's scheduler: a bounded queue of jobs and the worker that decodes them on the engine.

A job is one choice of one HTTP request: an engine `Request`, its deadline, a cancel flag, and an asyncio
queue that the worker fills (from its own thread) with events: ("step", text, step), then ("done", finish) or
("error", status, message). A client that goes away sets the cancel flag; the worker closes the job's decode
generator at the next step, which frees its slot and its cache.

The worker decodes up to `max_batch` jobs together with continuous batching (`Engine.runner`, `decoding.batch`):
a job joins the batch after its prompt's own forward pass and leaves at once when it ends, is cancelled or
times out. A superposed request (`decoding.superposed`: n choices from one stream) is one queued job whose
`group` holds its n choices' jobs: it runs beside the batch, one superposed step per batch step
(`Engine.superpose`), and its choices come out whole at its end, each to its own job.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from skipjack.engine import Engine, Request
from skipjack.errors import http_status, message
from skipjack.server.metrics import Metrics


class QueueFull(Exception):
    """No room for another job (or the server is draining): 503 with Retry-After."""


@dataclass
class Job:
    request: Request
    method: str  # the method spec it runs with (for metrics and the response)
    loop: asyncio.AbstractEventLoop
    deadline: float | None = None  # time.monotonic() after which it ends with finish "timeout"
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    group: list[Job] | None = None  # superposed: its n choices' jobs (this one first, the one queued); else None

    def put(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Scheduler:
    def __init__(self, engine: Engine, metrics: Metrics, max_queue: int = 64, max_batch: int = 8, chunk: int = 0):
        """`chunk`: a joining prompt runs that many tokens per step between the batch's steps (0: whole)."""
        self.engine, self.metrics, self.max_queue, self.max_batch = engine, metrics, max_queue, max_batch
        self.chunk = chunk or None
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.waiting = self.running = 0
        self.groups: dict[int, tuple] = {}  # id(job) -> (its superposed steps, job, time started): beside the batch
        self.draining = False
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.thread = threading.Thread(target=self._work, name="skipjack-worker", daemon=True)
        self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of a request's jobs, or none (QueueFull)."""
        with self._lock:
            if self.draining:
                raise QueueFull("the server is shutting down")
            if self.waiting + len(jobs) > self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} waiting)")
            self.waiting += len(jobs)
            self.metrics.waiting.set(self.waiting)
        for job in jobs:
            self.jobs.put(job)

    def idle(self) -> bool:
        with self._lock:
            return self.waiting == 0 and self.running == 0

    def drain(self, timeout: float) -> bool:
        """Refuse new jobs, then wait (at most `timeout` s) for the queued and running ones to end."""
        with self._lock:
            self.draining = True
            end = time.monotonic() + timeout
            while self.waiting or self.running:
                if not self._idle.wait(max(0.0, end - time.monotonic())) and time.monotonic() >= end:
                    return False
            return True

    def stop(self) -> None:
        self.jobs.put(None)

    def _work(self) -> None:
        """Admit queued jobs (each prefilled alone) while there is room, run one batched step of all live ones and
        one step of each superposed run, deliver their events, end the cancelled and timed-out ones; block while
        idle."""
        runner, live = self.engine.runner(self.chunk), {}  # id(handle) -> (handle, job, time of its last step)
        while True:
            if not self._fill(runner, live):
                return
            if live:
                runner = self._step(runner, live)
            self._step_groups()

    def _fill(self, runner, live: dict) -> bool:
        """Admit queued jobs while there is room (block while nothing runs); False once told to stop."""
        while len(live) + len(self.groups) < self.max_batch:
            try:
                job = self.jobs.get() if not (live or self.groups) else self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return False
            self._count(-1, 1)  # running from here: prefilled, then in the batch
            if job.cancelled.is_set():
                self._count(0, -1)
                continue
            if job.group is not None:
                self._start_group(job)
            else:
                self._admit(runner, live, job)
        return True

    def _step(self, runner, live: dict):
        """One batched step; the runner to go on with (a new one when the batch's pass failed)."""
        try:
            steps = runner.step()
        except Exception as e:  # the batch's pass failed: every live job ends with the error
            for _h, job, _ in live.values():
                job.put("error", http_status(e), message(e))
            self._count(0, -len(live))
            live.clear()
            return self.engine.runner(self.chunk)
        now = time.perf_counter()
        for h, text, step in steps:
            _, job, last = live[id(h)]
            self.metrics.step(job.method, step, now - last, first=step is h.first)
            if step is h.first:
                self.metrics.first(len(job.request.prompt), step)
            live[id(h)] = (h, job, now)
            job.put("step", text, step)
            if step.finish:
                self._end(live, h, job, step.finish)
        for h, job, _ in list(live.values()):
            why = _stopped(job)
            if why:
                runner.drop(h)
                self._end(live, h, job, why)
        return runner

    def _start_group(self, job: Job) -> None:
        """A superposed request: its prompt now (alone), its steps later, one per batch step."""
        self.metrics.prompt_tokens.labels(job.method).inc(len(job.request.prompt))
        try:
            steps = self.engine.superpose(job.request)
            next(steps)  # its prompt's pass
        except Exception as e:  # bad input: 400; a resource: 503; a fault or a bug: 500 with one line; goes on
            self._count(0, -1)
            for j in job.group:
                j.put("error", http_status(e), message(e))
            return
        self.groups[id(job)] = (steps, job, time.perf_counter())

    def _step_groups(self) -> None:
        """One step of each superposed run; a finished one's choices go to their jobs, whole."""
        for key, (steps, job, t) in list(self.groups.items()):
            why = _stopped(job)
            try:
                out = None if why else next(steps)
            except Exception as e:
                for j in job.group:
                    j.put("error", http_status(e), message(e))
                del self.groups[key]
                self._count(0, -1)
                continue
            if why:
                steps.close()
                self._end_group(key, job, [why] * len(job.group))
            elif out is not None:
                for j, c in zip(job.group, out):
                    self.metrics.step(job.method, c.step, time.perf_counter() - t, first=True)
                    j.put("step", c.text, c.step)
                finishes = [c.step.finish or "length" for c in out]
                self._end_group(key, job, finishes + ["stop"] * (len(job.group) - len(out)))  # fewer drafts than n

    def _end_group(self, key: int, job: Job, finishes: list[str]) -> None:
        del self.groups[key]
        self._count(0, -1)
        for j, finish in zip(job.group, finishes):
            self.metrics.requests.labels(job.method, finish).inc()
            j.put("done", finish)

    def _admit(self, runner, live: dict, job: Job) -> None:
        self.metrics.prompt_tokens.labels(job.method).inc(len(job.request.prompt))
        t = time.perf_counter()
        try:
            h = runner.add(job.request)  # its prompt's forward pass, alone
        except Exception as e:  # bad input: 400; a resource: 503; a fault or a bug: 500 with one line; goes on
            self._count(0, -1)
            job.put("error", http_status(e), message(e))
            return
        now = time.perf_counter()
        if h.first is None:  # a chunked prefill: its first step comes out of a later `step`
            live[id(h)] = (h, job, t)
            return
        self.metrics.step(job.method, h.first, now - t, first=True)
        self.metrics.first(len(job.request.prompt), h.first)
        job.put("step", h.first_text, h.first)
        live[id(h)] = (h, job, now)
        if h.first.finish:
            self._end(live, h, job, h.first.finish)

    def _end(self, live: dict, h, job: Job, finish: str) -> None:
        del live[id(h)]
        self._count(0, -1)
        self.metrics.requests.labels(job.method, finish).inc()
        job.put("done", finish)

    def _count(self, waiting: int, running: int) -> None:
        with self._lock:
            self.waiting += waiting
            self.running += running
            self.metrics.waiting.set(self.waiting)
            self.metrics.running.set(self.running)
            if not (self.waiting or self.running):
                self._idle.notify_all()


def _stopped(job: Job) -> str | None:
    """Why a running job must end now ("cancelled": its client went away; "timeout"), or None. A superposed
    run is cancelled when any of its choices' clients went away (they are one client)."""
    if any(j.cancelled.is_set() for j in job.group or [job]):
        return "cancelled"
    if job.deadline is not None and time.monotonic() > job.deadline:
        return "timeout"
    return None
