"""A fleet's ingress: the one-process server's FastAPI app (`server.app.create_app`: the same endpoints, errors,
streaming and metrics) with a front in place of the engine and a scheduler that sends each job to a replica.

- `Front`: what the app asks of an engine that needs no weights, from the model's tokenizer and shape
  (`loading.load.describe`): tokenizing, the pure request check (`engine.checked`), the context. The two calls
  that need the weights (embeddings, echo's prompt logprobs) go to a replica.
- `Fleet`: the app's scheduler. `submit` starts one task per job that streams the job's events from a replica's
  `decode` (the prefix-aware router picks the replica, `deploy.router`) into the job's queue, which the app's
  `Reply` reads as it reads the local worker's. A client that leaves cancels the call. A replica that dies
  before the job's first event: the job is sent once more (to another replica); after it: a clean 503 error
  ("send it again"), counted in `skipjack:replica_lost_requests` by outcome (retried, failed). Every replica's
  queue full: 503 with Retry-After.
- `FleetMetrics`: /metrics is every live replica's metrics, each sample labelled `replica` (from the board,
  `deploy.board`), and this ingress's own counter.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, ReplicaUnavailableError, RequestCancelledError

from skipjack.engine import checked
from skipjack.errors import http_status, message
from skipjack.loading.load import describe
from skipjack.request import Request
from skipjack.server.app import create_app
from skipjack.server.metrics import merge
from skipjack.server.scheduler import Job, QueueFull

log = logging.getLogger("ray.serve")
RETRIES = 1  # a job whose replica died before its first event is sent again this many times
LOST = (RayActorError, ReplicaUnavailableError)  # the replica's process died or is unreachable


class Front:
    """The engine as the app sees it, without weights (the module's docstring)."""

    def __init__(self, spec: str | None, dtype: str, replicas):
        d = describe(spec, dtype)
        self.name, self.source, self.tokenizer, self.load_seconds = d.name, d.source, d.tokenizer, d.seconds
        self.context, self.vocab_size, self.hidden_size = d.context, d.vocab_size, d.hidden_size
        self.replicas = replicas

    def check(self, request: Request):
        return checked(request, self.vocab_size)[0]

    def embed(self, ids: list[int]) -> list[float]:  # called in a worker thread (`asyncio.to_thread`)
        return self.replicas.embed.remote(ids).result()

    def prompt_logprobs(self, ids: list[int], top: int = 0):
        return self.replicas.prompt_logprobs.remote(ids, top).result()


class FleetMetrics:
    def __init__(self, board):
        self.board, self.registry = board, CollectorRegistry()
        self.lost = Counter(
            "skipjack:replica_lost_requests",
            "Requests whose replica died: sent again (retried) or ended with an error (failed).",
            ["outcome"],
            registry=self.registry,
        )
        self.shared = Gauge(
            "skipjack:shared_ngram_contexts", "Contexts in each n-gram table merged across replicas.", ["table"],
            registry=self.registry,
        )  # fmt: skip

    async def render(self, front) -> bytes:
        """The live replicas' metrics and this ingress's; its own alone while the board is away (restarting)."""
        try:
            replicas = await self.board.metrics.remote()
            for name, n in (await self.board.sizes.remote()).items():
                self.shared.labels(name).set(n)
        except Exception as e:  # the board restarting: the ingress's own metrics still answer
            replicas = {}
            log.warning("skipjack ingress: the board did not answer for /metrics: %s", e)
        return (merge(replicas) + generate_latest(self.registry).decode()).encode()


class Fleet:
    """The app's scheduler over the replicas (the module's docstring)."""

    def __init__(self, replicas, metrics: FleetMetrics):
        self.replicas, self.metrics = replicas.options(stream=True), metrics
        self.draining = False
        self.tasks: set[asyncio.Task] = set()

    def submit(self, jobs: list[Job]) -> None:
        if self.draining:
            raise QueueFull("the server is shutting down")
        for job in jobs:
            task = job.loop.create_task(self._run(job))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _run(self, job: Job) -> None:
        """A job (a superposed request's: its whole group) on a replica, sent again while nothing came back."""
        targets = job.group or [job]
        for attempt in range(RETRIES + 1):
            sent, ended = [0], set()  # events delivered so far; the choices that have ended
            try:
                await self._stream(job, targets, sent, ended)
                return
            except LOST:
                if sent[0] == 0 and attempt < RETRIES:
                    self.metrics.lost.labels("retried").inc()
                    continue
                self.metrics.lost.labels("failed").inc()
                why = (503, f"the replica decoding this request stopped after {sent[0]} steps; send it again")
            except RequestCancelledError:  # the client left: nobody reads the job any more
                return
            except BackPressureError:
                why = (503, "every replica's queue is full")
            except Exception as e:  # a fault or a bug on either side: its status and one line
                why = (http_status(e), message(e))
            for k, target in enumerate(targets):
                if k not in ended:
                    target.events.put_nowait(("error", *why))
            return

    async def _stream(self, job: Job, targets: list[Job], sent: list[int], ended: set[int]) -> None:
        """The request's events from one replica's `decode` into its jobs' queues, until they end or it is
        cancelled."""
        left = None if job.deadline is None else max(0.0, job.deadline - time.monotonic())
        stream = self.replicas.decode.remote(job.request, job.method, left)
        watch = asyncio.get_running_loop().create_task(_cancel(job, stream))
        try:
            async for k, ev in stream:
                targets[k].events.put_nowait(ev)
                sent[0] += 1
                if ev[0] != "step":
                    ended.add(k)
        finally:
            watch.cancel()


async def _cancel(job: Job, stream) -> None:
    """Cancel the replica's call when the job is cancelled (the client left, or its reply has ended)."""
    while not job.cancelled.is_set():
        await asyncio.sleep(0.25)
    stream.cancel()


class Ingress:
    """The ingress deployment's class: Serve calls `__serve_build_asgi_app__` after `__init__` for its app."""

    def __init__(self, options, replicas, board):
        self.options = options
        self.metrics = FleetMetrics(board)
        self.front = Front(options.settings.model, options.settings.dtype, replicas)
        self.fleet = Fleet(replicas, self.metrics)

    def __serve_build_asgi_app__(self):
        return create_app(self.options.settings, self.front, scheduler=self.fleet, metrics=self.metrics)

    async def __del__(self) -> None:
        self.fleet.draining = True
        end = time.monotonic() + self.options.drain
        while self.fleet.tasks and time.monotonic() < end:
            await asyncio.sleep(0.1)
