"""`skipjack.deploy`: skipjack replicas on Ray Serve, one application on a laptop or a cluster.

    skipjack serve --replicas 2 --threads 1                                  # starts Ray here, or --address
    serve run skipjack.deploy:app model=smollm2-135m replicas=2 threads=1     # Ray's own CLI, or a config file

Three deployments (`serving.application`):
- `Replica` (`deploy.replica`), `replicas` of them (autoscaled up to `max_replicas`), each `threads` CPUs: one
  `Engine` with its continuous batch, prefix cache and metrics; at most `max_batch` requests at once.
- `Ingress` (`deploy.front`), no CPU of its own: the one-process server's FastAPI app, its engine a front with
  the tokenizer only and its scheduler streaming each job from a replica chosen by the prefix-aware router
  (`deploy.router`, `deploy.routing`; `routing=random`: Serve's default, power of two choices).
- `Board` (`deploy.board`), one, no CPU: what replicas share (metrics, the n-gram tables, the tuning files).
"""

from __future__ import annotations


def app(args: dict):
    """`serve run skipjack.deploy:app k=v ...` (or `import_path` in a Serve config file): Serve's application
    builder, `args` as `schemas.DeployArgs` reads them (`deploy.serving`)."""
    from skipjack.deploy.serving import application, options

    return application(options(args))
