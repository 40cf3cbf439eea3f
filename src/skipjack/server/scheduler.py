"""The server's scheduler: a bounded queue of jobs and the worker that decodes them on the engine.

A job is one choice of one HTTP request: an engine `Request`, its deadline, a cancel flag, and an asyncio
queue that the worker fills (from its own thread) with events: ("step", text, step), then ("done", finish) or
("error", status, message). A client that goes away sets the cancel flag; the worker closes the job's decode
generator at the next step, which frees its slot and its cache.

The worker runs one job at a time (the engine's decode generator is single-sequence today); the queue, the
events, cancellation, timeouts and draining are what a batching worker keeps.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from skipjack.engine import Engine, Request
from skipjack.errors import SkipjackError, one_line
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

    def put(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Scheduler:
    def __init__(self, engine: Engine, metrics: Metrics, max_queue: int = 64):
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.waiting = self.running = 0
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
        while (job := self.jobs.get()) is not None:
            with self._lock:
                self.waiting -= 1
                self.running += 1
                self.metrics.waiting.set(self.waiting)
                self.metrics.running.set(self.running)
            try:
                if not job.cancelled.is_set():
                    self._run(job)
            finally:
                with self._lock:
                    self.running -= 1
                    self.metrics.running.set(self.running)
                    self._idle.notify_all()

    def _run(self, job: Job) -> None:
        m = job.method
        self.metrics.prompt_tokens.labels(m).inc(len(job.request.prompt))
        steps = self.engine.stream(job.request)
        finish, t = "length", time.perf_counter()
        try:
            for i, (text, step) in enumerate(steps):
                now = time.perf_counter()
                self.metrics.step(m, step, now - t, first=i == 0)
                t = now
                job.put("step", text, step)
                finish = step.finish or finish
                if step.finish:
                    break
                if job.cancelled.is_set():
                    finish = "cancelled"
                    break
                if job.deadline is not None and time.monotonic() > job.deadline:
                    finish = "timeout"
                    break
        except SkipjackError as e:
            job.put("error", 400, one_line(str(e)))
            return
        except Exception as e:  # a bug: the client gets a 500 with one line, the server goes on
            job.put("error", 500, one_line(f"internal error: {type(e).__name__}: {e}"))
            return
        finally:
            steps.close()  # a generator stopped early frees its cache here
        self.metrics.requests.labels(m, finish).inc()
        job.put("done", finish)
