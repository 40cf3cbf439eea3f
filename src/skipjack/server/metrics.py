"""Prometheus metrics for `skipjack serve`, named after vLLM's (`vllm:*` -> `skipjack:*`), each per method."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        m = ["method"]
        self.running = Gauge("skipjack:num_requests_running", "Requests being decoded.", registry=r)
        self.waiting = Gauge("skipjack:num_requests_waiting", "Requests waiting for a slot.", registry=r)
        self.load = Gauge(
            "skipjack:load_seconds", "Loading the model and preparing its methods (never a request's time).", registry=r
        )
        self.ttft = Histogram(
            "skipjack:time_to_first_token_seconds", "Time to first token.", m, buckets=LATENCY, registry=r
        )
        self.itl = Histogram(
            "skipjack:inter_token_latency_seconds", "Time between output tokens.", m, buckets=LATENCY, registry=r
        )
        self.prompt_tokens = Counter("skipjack:prompt_tokens", "Prompt tokens processed.", m, registry=r)
        self.generation_tokens = Counter("skipjack:generation_tokens", "Tokens generated.", m, registry=r)
        self.drafts = Counter("skipjack:spec_decode_num_drafts", "Verify steps with a draft.", m, registry=r)
        self.draft_tokens = Counter("skipjack:spec_decode_num_draft_tokens", "Draft tokens verified.", m, registry=r)
        self.accepted = Counter("skipjack:spec_decode_num_accepted_tokens", "Draft tokens accepted.", m, registry=r)
        self.per_pos = Counter(
            "skipjack:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted at each draft position (0 = first).",
            ["method", "position"],
            registry=r,
        )
        self.requests = Counter(
            "skipjack:request_success", "Finished requests by finish reason.", ["method", "finished_reason"], registry=r
        )
        self.prefix_queries = Counter(
            "skipjack:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", registry=r
        )
        self.prefix_hits = Counter(
            "skipjack:prefix_cache_hits", "Prompt tokens taken from the prefix cache (not run again).", registry=r
        )

    def first(self, prompt_tokens: int, step) -> None:
        """A request's first step: how many of its prompt tokens the prefix cache held (vLLM's counters)."""
        self.prefix_queries.inc(prompt_tokens)
        self.prefix_hits.inc(max(0, prompt_tokens - step.forward_tokens))

    def step(self, method: str, step, seconds: float, first: bool) -> None:
        """One decoding step of a request: its tokens, its draft, its latency (the first: time to first token)."""
        n = len(step.tokens)
        self.generation_tokens.labels(method).inc(n)
        if first:
            self.ttft.labels(method).observe(seconds)
        elif n:
            for _ in range(n):  # a step that emits n tokens spaces them evenly, as vLLM counts it
                self.itl.labels(method).observe(seconds / n)
        if step.drafted:
            self.drafts.labels(method).inc()
            self.draft_tokens.labels(method).inc(step.drafted)
            self.accepted.labels(method).inc(step.accepted)
            for pos in range(step.accepted):
                self.per_pos.labels(method, str(pos)).inc()

    async def render(self, engine) -> bytes:
        """/metrics: the load time set from `engine` (None while loading), then `text`."""
        if engine is not None:
            self.load.set(engine.load_seconds)
        return self.text(engine.name if engine is not None else None)

    def text(self, model: str | None = None) -> bytes:
        """The metrics, each also under vLLM's name (`vllm:*`, with vLLM's `model_name` label when `model` is
        given) where the meaning is the same, so dashboards and load generators that read vLLM's work."""
        own = generate_latest(self.registry).decode()
        return (own + "".join(_vllm(line, model) + "\n" for line in own.splitlines() if _mirrored(line))).encode()


VLLM_SKIP = ("skipjack:load_seconds",)  # no vLLM metric means the same


def _mirrored(line: str) -> bool:
    parts = line.split()
    name = (parts[2] if len(parts) > 2 else "") if line.startswith("#") else re.match(r"[^\s{]*", line).group()
    return name.startswith("skipjack:") and not name.startswith(VLLM_SKIP)


def _vllm(line: str, model: str | None) -> str:
    """A `skipjack:` exposition line under vLLM's name (and label)."""
    line = line.replace("skipjack:", "vllm:", 1)
    return line if model is None or line.startswith("#") else labelled(line, "model_name", model)


def labelled(line: str, key: str, value: str) -> str:
    """A sample line with one more label, first: `name{key="value",...} v`."""
    label = f'{key}="' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    name, rest = re.match(r"([^\s{]+)(.*)", line).groups()
    return f"{name}{{{label},{rest[1:]}" if rest.startswith("{") else f"{name}{{{label}}}{rest}"


def merge(texts: dict[str, str], key: str = "replica") -> str:
    """Several processes' expositions as one: each sample labelled with its source (`key`), each family's
    HELP and TYPE once, its samples from every source together (what Prometheus's format asks)."""
    families: dict[str, tuple[list[str], list[str]]] = {}
    for source, text in texts.items():
        family = None
        for line in text.splitlines():
            parts = line.split()
            if line.startswith("#") and len(parts) > 2 and parts[1] in ("HELP", "TYPE"):
                family = parts[2]
                head, _ = families.setdefault(family, ([], []))
                if not any(h.split()[1] == parts[1] for h in head):
                    head.append(line)
            elif line.strip() and family is not None:
                families[family][1].append(labelled(line, key, source))
    return "".join("\n".join(head + samples) + "\n" for head, samples in families.values())
