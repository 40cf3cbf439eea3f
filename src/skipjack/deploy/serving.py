"""The fleet's options, its Serve application (`application`) and `skipjack serve --replicas` (`main`): the
package's docstring says what runs."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import types
from dataclasses import dataclass
from typing import TYPE_CHECKING

from skipjack import schemas, server, validate
from skipjack.errors import SkipjackError

if TYPE_CHECKING:
    from skipjack.server.app import Settings

APP = "skipjack"  # the Serve application's name
ROUTER = "skipjack.deploy.router:PrefixRouter"


@dataclass
class Options:
    settings: Settings
    replicas: int = 1
    max_replicas: int | None = None  # autoscaled between `replicas` and this many; None: a fixed count
    threads: int = 1  # torch threads (and Ray CPUs) per replica
    routing: str = "prefix"  # or "random" (Serve's default router)
    share: float = 60.0  # seconds between n-gram table merges through the board (0: each replica keeps its own)
    drain: float = 30.0  # seconds a stopping replica waits for its running requests


def options(args: dict) -> Options:
    """The application's options from Serve's `args` (`schemas.DeployArgs`), every value checked."""
    a = schemas.parse("the application's args", args if args is not None else {}, schemas.DeployArgs)
    fields = a.model_dump()
    return fleet(types.SimpleNamespace(**fields, no_tune=not a.tune))


def fleet(a) -> Options:
    """Options from parsed arguments (the CLI's, or `options`'), the server's through `server.settings`."""
    replicas = validate.integer("--replicas", a.replicas, 1, 1024)
    if a.max_replicas is not None:
        validate.integer("--max-replicas", a.max_replicas, replicas, 1024)
    validate.integer("--threads", a.threads, 1, 1024)
    if a.routing not in ("prefix", "random"):
        raise SkipjackError(f"--routing must be prefix or random (got {a.routing!r:.40})")
    validate.number("--share", a.share, 0.0, 86_400.0)
    validate.number("--drain", a.drain, 0.0, 86_400.0)
    return Options(server.settings(a), replicas, a.max_replicas, a.threads, a.routing, a.share, a.drain)


def application(o: Options):
    """The Serve application: the ingress bound to the replicas and the board (the module's docstring)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from skipjack.deploy.board import Board
    from skipjack.deploy.front import Ingress
    from skipjack.deploy.replica import Replica

    quiet = {"log_level": "WARNING", "enable_access_log": False}
    light = {"ray_actor_options": {"num_cpus": 0}, "logging_config": quiet}
    board = serve.deployment(Board, name="Board", num_replicas=1, **light).bind()
    scale = {"num_replicas": o.replicas}
    if o.max_replicas is not None and o.max_replicas > o.replicas:
        target = max(1, o.settings.max_batch // 2)
        auto = {"min_replicas": o.replicas, "max_replicas": o.max_replicas, "target_ongoing_requests": target}
        scale = {"autoscaling_config": auto}
    router = RequestRouterConfig(request_router_class=ROUTER) if o.routing == "prefix" else RequestRouterConfig()
    replica = serve.deployment(
        Replica,
        name="Replica",
        **scale,
        max_ongoing_requests=o.settings.max_batch,  # a replica is full when its batch is: the router looks on
        max_queued_requests=o.settings.max_queue,  # beyond this many waiting for a replica: 503
        ray_actor_options={"num_cpus": o.threads},
        graceful_shutdown_timeout_s=o.drain,
        graceful_shutdown_wait_loop_s=0.5,
        request_router_config=router,
        logging_config=quiet,
    ).bind(o, board)
    ingress = serve.deployment(
        serve.ingress()(Ingress),
        name="Ingress",
        max_ongoing_requests=100_000,
        graceful_shutdown_timeout_s=o.drain,
        **light,
    )
    return ingress.bind(o, replica, board)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`skipjack serve`'s arguments, and with --replicas the fleet's."""
    server.add_arguments(p)
    g = p.add_argument_group("replicas on Ray Serve (skipjack.deploy)")
    g.add_argument("--replicas", type=int, default=None, help="serve with this many replicas on Ray Serve")
    g.add_argument("--max-replicas", type=int, default=None, help="autoscale from --replicas up to this many")
    g.add_argument("--threads", type=int, default=1, help="torch threads (and Ray CPUs) per replica")
    g.add_argument("--routing", default="prefix", help="prefix (keeps caches warm) or random (Serve's default)")
    g.add_argument("--share", type=float, default=60.0, help="seconds between n-gram table merges (0: never)")
    g.add_argument("--drain", type=float, default=30.0, help="seconds a stopping replica finishes its requests")
    g.add_argument("--address", default=None, help="a running Ray cluster (ray start --head); default: start one")


def main(a) -> int:
    """`skipjack serve`: one process, or with --replicas a fleet on Ray Serve until SIGTERM or Ctrl-C."""
    if a.replicas is None:
        if a.max_replicas is not None:
            raise SkipjackError("--max-replicas needs --replicas (the fewest replicas)")
        return server.main(a)
    validate.integer("--port", a.port, 1, 65535)
    o = fleet(a)
    try:
        import ray
        from ray import serve
    except ImportError:
        raise SkipjackError("--replicas needs Ray Serve: pip install 'skipjack[ray]'") from None
    ray.init(address=a.address, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        if a.address is None and o.replicas * o.threads > ray.cluster_resources().get("CPU", 0):
            raise SkipjackError(
                f"--replicas {o.replicas} x --threads {o.threads} need {o.replicas * o.threads} CPUs; "
                f"this machine has {ray.cluster_resources().get('CPU', 0):.0f} (or join a cluster with --address)"
            )
        serve.start(http_options={"host": a.host, "port": a.port})
        serve.run(application(o), name=APP, route_prefix="/")
        print(f"skipjack: serving {o.replicas} replicas on http://{a.host}:{a.port}/v1", file=sys.stderr)
        _until_signal()
        print("skipjack: draining the replicas (a second signal stops at once)", file=sys.stderr)
        serve.delete(APP) if a.address is not None else serve.shutdown()
    finally:
        ray.shutdown()
    return 0


def _until_signal() -> None:
    """Block until SIGTERM or SIGINT; a second one exits at once."""
    stop = threading.Event()

    def handle(sig, frame) -> None:
        if stop.is_set():
            raise SystemExit(1)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    while not stop.wait(0.5):
        pass
