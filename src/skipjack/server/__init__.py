"""`skipjack serve`: the OpenAI-compatible server (`app`), its scheduler and metrics.

`serve` runs the app on uvicorn, bound to 127.0.0.1 unless told otherwise. SIGTERM (or Ctrl-C) drains: new
requests get 503 at once, the queued and running ones finish (at most `drain` seconds), then it exits; a
second signal stops it at once.
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import TYPE_CHECKING

import uvicorn

from skipjack import validate

if TYPE_CHECKING:
    from skipjack.server.app import Settings

DRAIN_S = 30.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: float = DRAIN_S):
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig, frame) -> None:
        sched = self.config.app.state.scheduler
        if sched is None or sched.draining:  # still loading, or a second signal: stop now
            return super().handle_exit(sig, frame)
        sched.draining = True  # from here on, new requests get 503

        def drained() -> None:
            sched.drain(self.drain)
            self.should_exit = True

        threading.Thread(target=drained, name="skipjack-drain", daemon=True).start()


def serve(settings, host: str = "127.0.0.1", port: int = 8000, drain: float = DRAIN_S) -> None:
    from skipjack.server.app import create_app

    config = uvicorn.Config(
        create_app(settings), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5
    )
    DrainingServer(config, drain).run()


def add_arguments(v: argparse.ArgumentParser) -> None:
    v.add_argument("--model", "-m", default=None, help="named model, .gguf file, HF folder or hub id")
    v.add_argument("--dtype", default="auto", help="as for generate (auto: q4 for a GGUF)")
    v.add_argument(
        "--method",
        default="auto",
        help="default decoding method (auto: the fastest lossless one, its drafts sized by the measured costs of "
        "the batch's passes, so it turns down as the batch grows); a request's speculative.method wins",
    )
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1 and /tokenize")
    v.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; then 503 + Retry-After")
    v.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most (continuous batching)")
    v.add_argument("--timeout", type=float, default=600.0, help="seconds per request before it is ended")
    v.add_argument("--no-tune", action="store_true", help="skip measuring this machine's fastest kernels")
    v.add_argument(
        "--prefill-chunk",
        type=int,
        default=128,
        help="a joining prompt runs this many tokens between the running requests' steps (0: all at once)",
    )
    v.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=512,
        help="memory for finished requests' KV caches, reused by later prompts with the same prefix (0: off)",
    )


def settings(a) -> Settings:
    """The server's settings from parsed arguments (or anything with their names), every one checked before the
    model loads; "auto" dtype resolved here, once."""
    from skipjack.decoding.batch import MAX_ROWS
    from skipjack.decoding.plan import resolve
    from skipjack.loading.load import resolve_dtype
    from skipjack.server.app import Settings
    from skipjack.store import check_home

    validate.integer("--max-queue", a.max_queue, 1, 100_000)
    validate.integer("--max-batch", a.max_batch, 1, MAX_ROWS)
    validate.number("--timeout", a.timeout, 0.0, 86_400.0, lo_open=True)
    validate.integer("--prefix-cache-mb", a.prefix_cache_mb, 0, 1 << 20)
    validate.integer("--prefill-chunk", a.prefill_chunk, 0, 1 << 20)
    resolve(validate.text("--method", a.method, empty=False))  # a bad --method fails now: parsed, nothing built
    if a.model is not None:
        validate.text("--model", a.model, empty=False)
    check_home()
    dtype, note = resolve_dtype(a.model, a.dtype)
    if note:
        print(note, file=sys.stderr)
    return Settings(
        model=a.model,
        dtype=dtype,
        method=a.method,
        api_key=a.api_key,
        max_queue=a.max_queue,
        max_batch=a.max_batch,
        timeout=a.timeout,
        tune=not a.no_tune,
        prefix_cache_mb=a.prefix_cache_mb,
        prefill_chunk=a.prefill_chunk,
    )


def main(a) -> int:
    """`skipjack serve`: every setting checked before the model loads."""
    validate.integer("--port", a.port, 1, 65535)
    s = settings(a)
    print(
        f"skipjack: serving on http://{a.host}:{a.port}/v1 (loading the model; /health says 200 when ready)",
        file=sys.stderr,
    )
    serve(s, a.host, a.port)
    return 0
