"""`skipjack serve`: the OpenAI-compatible server (`app`), its scheduler and metrics.

`serve` runs the app on uvicorn, bound to 127.0.0.1 unless told otherwise. SIGTERM (or Ctrl-C) drains: new
requests get 503 at once, the queued and running ones finish (at most `drain` seconds), then it exits; a
second signal stops it at once.
"""

from __future__ import annotations

import threading

import uvicorn

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
