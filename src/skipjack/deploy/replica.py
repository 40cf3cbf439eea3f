"""A fleet's replica: one `Engine`, its continuous batch (the server's `Scheduler`), its prefix cache and its
metrics, as a Ray Serve replica that the ingress (`deploy.front`) streams jobs to.

`decode(request, method, seconds)` is a job's events, as the one-process server's worker puts them: ("step",
text, step) ... then ("done", finish) or ("error", status, message), each with its choice's index (a superposed
request's n choices are one run). The request starts from this replica's prefix cache (the router sends a
prompt where its prefix most likely is). A cancelled call (the client left) frees the job's slot at the next
step. Stopping (a rolling update, a scale-down, `serve shutdown`, SIGTERM to
`skipjack serve --replicas`): Serve sends no new requests and waits for the running ones (at most the drain
time), then `__del__` stops the worker. What replicas share goes through the board (`deploy.board`): metrics
every second, the n-gram tables every `share` seconds, and the tuning files before and after the load.
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch
from ray import serve

from skipjack.deploy.board import take_files, tuning_files
from skipjack.engine import Engine
from skipjack.machine import cpu_name
from skipjack.request import Request
from skipjack.server.app import local
from skipjack.server.metrics import Metrics
from skipjack.server.scheduler import Job, QueueFull

log = logging.getLogger("ray.serve")


def kind(options) -> str:
    """A machine kind, as the tuning files are keyed: the CPU, the threads, torch, the model and its dtype."""
    s = options.settings
    return f"{cpu_name()}|{options.threads}|{torch.__version__}|{s.model}|{s.dtype}"


class Replica:
    async def __init__(self, options, board) -> None:
        self.options, self.board = options, board
        torch.set_num_threads(options.threads)
        self.id = serve.get_replica_context().replica_id.unique_id
        self.engine = await self._load()
        self.metrics = Metrics()
        self.scheduler, self.prefix = local(options.settings, self.engine, self.metrics)
        self.sharing = asyncio.get_running_loop().create_task(self._share())

    async def _load(self) -> Engine:
        """Load and tune; the first replica of a machine kind measures while the others wait, then they all read
        its files (`deploy.board`)."""
        s = self.options.settings
        if not s.tune:
            return await asyncio.to_thread(Engine.load, s.model, s.dtype, False)
        k, measured = kind(self.options), False
        while not await self.board.claim.remote(k, self.id):
            await asyncio.sleep(1.0)
        try:
            take_files(await self.board.get_files.remote())
            engine = await asyncio.to_thread(Engine.load, s.model, s.dtype, True)
            await self.board.add_files.remote(await asyncio.to_thread(tuning_files))
            measured = True
            return engine
        finally:
            await self.board.release.remote(k, measured)

    async def decode(self, request: Request, method: str, seconds: float | None):
        """One request's events (the module's docstring) as (k, event): k is the choice, 0 but for a superposed
        request's n choices (one run, a job each); `seconds`: what is left of its deadline."""
        if request.kv is None and self.prefix is not None:
            request.session = self.prefix.session()
        deadline = None if seconds is None else time.monotonic() + seconds
        jobs = [Job(request, method, asyncio.get_running_loop(), deadline) for _ in range(request.n)]
        for job in jobs:
            job.group = jobs if len(jobs) > 1 else None
        try:
            self.scheduler.submit(jobs[:1])
        except QueueFull as x:
            for k in range(len(jobs)):
                yield k, ("error", 503, str(x))
            return
        try:
            for k, job in enumerate(jobs):
                while True:
                    ev = await job.events.get()
                    yield k, ev
                    if ev[0] != "step":
                        break
        finally:
            for job in jobs:
                job.cancelled.set()  # a no-op once it ended; frees its slot when the caller went away

    async def embed(self, ids: list[int]) -> list[float]:
        return await asyncio.to_thread(self.engine.embed, ids)

    async def prompt_logprobs(self, ids: list[int], top: int):
        return await asyncio.to_thread(self.engine.prompt_logprobs, ids, top)

    def check_health(self) -> None:
        """Serve's health check: a replica whose decoding worker stopped is replaced."""
        if not self.scheduler.thread.is_alive():
            raise RuntimeError("the replica's decoding worker stopped")

    async def _share(self) -> None:
        """Publish the metrics every second and merge the n-gram tables every `share` seconds; a board that is
        away (restarting) is tried again at the next round."""
        last = time.monotonic()
        while True:
            try:
                text = (await self.metrics.render(self.engine)).decode()
                await self.board.publish.remote(self.id, text)
                if self.options.share and time.monotonic() - last >= self.options.share:
                    last = time.monotonic()
                    await self._merge_tables()
            except Exception as e:  # the board restarting, or gone while this replica stops
                log.warning("skipjack replica %s: sharing with the board failed: %s", self.id, e)
            await asyncio.sleep(1.0)

    async def _merge_tables(self) -> None:
        """Each n-gram table's rows to the board and the merged rows back (max-merge both ways)."""
        for name, table in list(self.engine.resources.tables.items()):
            rows = await asyncio.to_thread(self._rows, table)
            merged = await self.board.merge.remote(name, table.order, rows)
            await asyncio.to_thread(self._absorb, table, merged)

    def _rows(self, table) -> list:
        with self.engine.lock:  # the worker counts into the table during its steps
            return [(k, dict(v)) for k, v in table.next.items()]

    def _absorb(self, table, rows: list) -> None:
        with self.engine.lock:
            for key, kids in rows:
                table.merge_row(tuple(key), kids)

    async def __del__(self) -> None:
        self.scheduler.draining = True  # Serve has sent no request since it began stopping this replica
        await asyncio.to_thread(self.scheduler.drain, self.options.drain)
        self.scheduler.stop()
        self.sharing.cancel()
        try:
            await self.board.leave.remote(self.id)
        except Exception as e:  # the board stopping in the same shutdown
            log.warning("skipjack replica %s: leaving the board failed: %s", self.id, e)
