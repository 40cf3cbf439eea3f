"""`skipjack serve`: a real server on a free loopback port (uvicorn in a thread, the tiny model), driven with
the official `openai` client and raw HTTP: responses, streaming, per-request speculation, metrics, hostile
input, a full queue, cancellation, timeouts, and SIGTERM draining (a real `skipjack serve` process)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from skipjack.decoding.sampling import SamplingParams
from skipjack.engine import Engine, Request
from skipjack.server.app import Settings, create_app


@contextlib.contextmanager
def running(app):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        t.join(10)
        app.state.scheduler.stop()


@pytest.fixture(scope="module")
def engine(tiny_folder):
    return Engine.load(str(tiny_folder), "fp32", tune=False)


@pytest.fixture(scope="module")
def url(engine):
    with running(create_app(Settings(), engine)) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def alone(engine, text: str, n: int, chat: bool = True, method: str = "plain", stop=()) -> str:
    """The same request through the engine directly: what a served greedy request must equal."""
    tok = engine.tokenizer
    ids = tok.prompt_ids([{"role": "user", "content": text}]) if chat else tok.prompt_ids(text, raw=True)
    p = SamplingParams(max_new_tokens=n, stop_token_ids=tok.stop_ids)
    return engine.complete(Request(ids, p, method, tuple(stop))).text


def chat_args(text: str, max_tokens=12, **kw) -> dict:
    msgs = [{"role": "user", "content": text}]
    return {"model": None, "messages": msgs, "max_tokens": max_tokens, "temperature": 0} | kw


def test_health_models_and_tokenize(url, engine):
    assert httpx.get(f"{url}/health").status_code == 200
    models = httpx.get(f"{url}/v1/models").json()
    assert models["data"][0]["id"] == engine.name
    ids = httpx.post(f"{url}/tokenize", json={"content": "hello world"}).json()["tokens"]
    assert ids == engine.tokenizer.encode("hello world")
    assert httpx.post(f"{url}/detokenize", json={"tokens": ids}).json()["content"] == "hello world"


def test_chat_and_completions_equal_the_engine_alone(client, engine):
    r = client.chat.completions.create(**chat_args("the quick brown fox"))
    assert r.choices[0].message.content == alone(engine, "the quick brown fox", 12)
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 0
    c = client.completions.create(model=None, prompt="def add ( a", max_tokens=10, temperature=0)
    assert c.choices[0].text == alone(engine, "def add ( a", 10, chat=False)
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens


@pytest.mark.parametrize("method", ["pld", "ngram", "pld:k=3"])
def test_per_request_speculation_is_lossless_and_reported(client, engine, method):
    text = "stop here please and then continue stop here please and then"
    r = client.chat.completions.create(
        **chat_args(text, 24), extra_body={"speculative": {"method": method, "n_max": 4}}
    )
    assert r.choices[0].message.content == alone(engine, text, 24)
    extra = r.model_extra
    assert extra["method"] == method and {"draft_n", "draft_n_accepted"} <= set(extra["timings"])
    assert extra["timings"]["draft_n_accepted"] <= extra["timings"]["draft_n"]
    off = client.chat.completions.create(**chat_args(text, 8), extra_body={"speculative": {"method": "off"}})
    assert off.model_extra["method"] == "plain" and off.model_extra["timings"]["draft_n"] == 0
    assert extra["lossless"] is True and off.model_extra["lossless"] is True


def test_a_lossy_method_is_labelled_lossy(client, engine):
    text = "one two three four five six"
    r = client.chat.completions.create(
        **chat_args(text, 8), extra_body={"speculative": {"method": "ffn-skip:threshold=0,keep_first=0,keep_last=0"}}
    )
    assert r.model_extra["method"].startswith("ffn-skip") and r.model_extra["lossless"] is False
    assert r.usage.completion_tokens == 8


@pytest.mark.parametrize("chat", [True, False])
def test_streamed_text_equals_whole_text(client, chat):
    """Also at temperature 1 over many tokens: multi-byte characters split across tokens come out whole."""
    for temp, seed in ((0, None), (1.0, 7), (1.0, 8)):
        if chat:
            args = chat_args("héllo wörld 日本語 🙂", 40, temperature=temp, seed=seed)
            whole = client.chat.completions.create(**args).choices[0].message.content
            parts = [
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(**args, stream=True)
                if c.choices
            ]
        else:
            args = {"model": None, "prompt": "naïve café 🙂", "max_tokens": 40, "temperature": temp, "seed": seed}
            whole = client.completions.create(**args).choices[0].text
            parts = [c.choices[0].text for c in client.completions.create(**args, stream=True) if c.choices]
        assert "".join(parts) == whole


def test_stream_usage_and_done(url):
    body = chat_args("hello", 6, stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] > 0


def test_stop_n_seed_and_logprobs(client, engine):
    text = "the quick brown fox"
    full = alone(engine, text, 20)
    stop = full[3:6]
    r = client.chat.completions.create(**chat_args(text, 20, stop=[stop]))
    assert r.choices[0].message.content == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"
    a = client.chat.completions.create(**chat_args(text, 12, temperature=0.9, seed=3, n=2))
    b = client.chat.completions.create(**chat_args(text, 12, temperature=0.9, seed=3, n=2))
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]
    lp = client.chat.completions.create(**chat_args(text, 5, logprobs=True, top_logprobs=2))
    items = lp.choices[0].logprobs.content
    assert len(items) >= 1 and all(x.logprob <= 0 and len(x.top_logprobs) == 2 for x in items)
    assert all(abs(x.top_logprobs[0].logprob - x.logprob) < 1e-5 for x in items)  # greedy: the top token
    c = client.completions.create(model=None, prompt="hello", max_tokens=4, temperature=0, logprobs=1)
    assert len(c.choices[0].logprobs.token_logprobs) == c.usage.completion_tokens


def test_metrics_mirror_vllm(client, url):
    client.chat.completions.create(
        **chat_args("stop here please stop here please", 10), extra_body={"speculative": {"method": "pld"}}
    )
    text = httpx.get(f"{url}/metrics").text
    for name in (
        "skipjack:num_requests_running",
        "skipjack:num_requests_waiting",
        "skipjack:time_to_first_token_seconds_bucket",
        "skipjack:inter_token_latency_seconds_bucket",
        'skipjack:prompt_tokens_total{method="pld"}',
        'skipjack:generation_tokens_total{method="pld"}',
        'skipjack:spec_decode_num_drafts_total{method="pld"}',
        'skipjack:spec_decode_num_draft_tokens_total{method="pld"}',
        'skipjack:spec_decode_num_accepted_tokens_total{method="pld"}',
    ):
        assert name in text, name


HOSTILE = [
    ("malformed-json", b'{"messages": [', 400),
    ("not-utf8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    ("not-an-object", b"[1, 2]", 400),
    ("missing-messages", {"model": "t"}, 400),
    ("empty-messages", {"messages": []}, 400),
    ("bad-role", {"messages": [{"role": "robot", "content": "x"}]}, 400),
    ("content-int", {"messages": [{"role": "user", "content": 5}]}, 400),
    ("max-tokens-huge", chat_args("x", 10**9), 400),
    ("max-tokens-string", chat_args("x", "5"), 400),
    ("max-tokens-zero", chat_args("x", 0), 400),
    ("temperature-negative", chat_args("x", temperature=-1), 400),
    ("temperature-string", chat_args("x", temperature="hot"), 400),
    ("n-huge", chat_args("x", n=10**6), 400),
    ("top-p-zero", chat_args("x", top_p=0), 400),
    ("seed-negative", chat_args("x", seed=-1), 400),
    ("stop-int", chat_args("x", stop=5), 400),
    ("stop-empty", chat_args("x", stop=[""]), 400),
    ("unknown-method", chat_args("x", speculative={"method": "magic"}), 400),
    ("bad-method-option", chat_args("x", speculative={"method": "pld:k=999"}), 400),
    ("n-max-huge", chat_args("x", speculative={"method": "pld", "n_max": 10**6}), 400),
    ("long-prompt", chat_args("word " * 400), 400),
    ("empty-content", chat_args("   "), 400),
    ("logprobs-too-many", chat_args("x", logprobs=True, top_logprobs=99), 400),
]


@pytest.mark.parametrize("name, body, status", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_is_a_clear_4xx(url, name, body, status):
    kw = (
        {"content": body, "headers": {"content-type": "application/json"}}
        if isinstance(body, bytes)
        else {"json": body}
    )
    r = httpx.post(f"{url}/v1/chat/completions", **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and "\n" not in err["message"] and err["code"] == status
    assert httpx.get(f"{url}/health").status_code == 200  # still serving


def test_body_over_the_limit_and_bad_completions(url):
    r = httpx.post(f"{url}/v1/completions", content=b"x" * (5 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    for body in (
        {"prompt": ""},
        {"prompt": []},
        {"prompt": ["a"] * 65},
        {"prompt": 5},
        {"prompt": [10**9]},
        {"prompt": "x", "logprobs": 50},
    ):
        r = httpx.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 400, (body, r.text)
    assert httpx.post(f"{url}/detokenize", json={"tokens": [10**9]}).status_code == 400
    assert httpx.post(f"{url}/tokenize", json={}).status_code == 400


def test_api_key(engine):
    with running(create_app(Settings(api_key="sekret"), engine)) as u:
        body = chat_args("x", 2)
        assert httpx.post(f"{u}/v1/chat/completions", json=body).status_code == 401
        bad = httpx.post(f"{u}/v1/chat/completions", json=body, headers={"authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
        ok = httpx.post(f"{u}/v1/chat/completions", json=body, headers={"authorization": "Bearer sekret"})
        assert ok.status_code == 200
        assert httpx.get(f"{u}/health").status_code == 200


def test_full_queue_is_503_with_retry_after(engine):
    app = create_app(Settings(max_queue=1), engine)
    with running(app) as u:
        sched = app.state.scheduler
        engine.lock.acquire()  # the worker blocks on its first job: one running, then one waiting
        try:
            results = []
            ts = [
                threading.Thread(
                    target=lambda: results.append(
                        httpx.post(f"{u}/v1/chat/completions", json=chat_args("x", 3), timeout=60)
                    )
                )
                for _ in range(2)
            ]
            for t in ts:
                t.start()
                time.sleep(0.3)
            deadline = time.time() + 10
            while (sched.running, sched.waiting) != (1, 1) and time.time() < deadline:
                time.sleep(0.05)
            r = httpx.post(f"{u}/v1/chat/completions", json=chat_args("x", 3))
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
        finally:
            engine.lock.release()
        for t in ts:
            t.join(30)
        assert [r.status_code for r in results] == [200, 200]


def test_disconnects_free_their_slots(engine):
    import psutil

    app = create_app(Settings(max_queue=64), engine)
    proc = psutil.Process()
    with running(app) as u:
        sched = app.state.scheduler
        httpx.post(f"{u}/v1/chat/completions", json=chat_args("warm up", 40))
        base = proc.memory_info().rss
        for _ in range(20):
            with httpx.stream(
                "POST", f"{u}/v1/chat/completions", json=chat_args("tell a story", 80, stream=True, temperature=1.0)
            ) as r:
                next(r.iter_lines())  # the first chunk, then the client goes away
        deadline = time.time() + 30
        while not sched.idle() and time.time() < deadline:
            time.sleep(0.05)
        assert sched.idle() and sched.jobs.qsize() == 0
        assert proc.memory_info().rss - base < 64 << 20  # stated tolerance: 64 MB


def test_per_request_timeout(engine):
    app = create_app(Settings(timeout=1e-6), engine)
    with running(app) as u:
        r = httpx.post(f"{u}/v1/chat/completions", json=chat_args("x", 60)).json()
        assert r["usage"]["completion_tokens"] < 60 and r["choices"][0]["finish_reason"] == "length"


def test_sigterm_drains(engine):
    """SIGTERM (the server's handler, called as the signal would): new requests get 503 at once, the one in flight
    finishes, then the server exits."""
    from skipjack.server import DrainingServer

    app = create_app(Settings(), engine)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = DrainingServer(uvicorn_config(app), drain=30)
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.01)
    u = f"http://127.0.0.1:{sock.getsockname()[1]}"
    done = []
    engine.lock.acquire()  # the request in flight waits here until the drain has begun
    try:
        c = threading.Thread(
            target=lambda: done.append(httpx.post(f"{u}/v1/chat/completions", json=chat_args("x", 6), timeout=60))
        )
        c.start()
        while app.state.scheduler.running == 0:
            time.sleep(0.01)
        server.handle_exit(signal.SIGTERM, None)
        refused = httpx.post(f"{u}/v1/chat/completions", json=chat_args("x", 2))
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
    finally:
        engine.lock.release()
    c.join(30)
    assert done[0].status_code == 200 and done[0].json()["usage"]["completion_tokens"] > 0
    t.join(30)
    assert not t.is_alive()
    app.state.scheduler.stop()


def uvicorn_config(app):
    import uvicorn

    return uvicorn.Config(app, log_level="error")


@contextlib.contextmanager
def serve_process(model: str, env: dict | None = None):
    """A real `skipjack serve` process on a free loopback port: (its URL, the process), once /health says 200;
    killed on the way out if still running."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "skipjack.cli", "serve", "--model", model, "--no-tune", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    u = f"http://127.0.0.1:{port}"
    try:
        status, deadline = None, time.time() + 120
        while status != 200 and time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                status = httpx.get(f"{u}/health").status_code
            time.sleep(0.1)
        assert status == 200
        yield u, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_serve_process_starts_and_stops_on_sigterm(tiny_folder, tmp_path):
    env = os.environ | {"SKIPJACK_HOME": str(tmp_path / "home")}
    with serve_process(str(tiny_folder), env) as (u, proc):
        r = httpx.post(f"{u}/v1/chat/completions", json=chat_args("hello", 4))
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--port", "0"], "--port"),
        (["--port", "70000"], "--port"),
        (["--max-queue", "0"], "--max-queue"),
        (["--timeout", "nan"], "--timeout"),
        (["--max-batch", "0"], "--max-batch"),
        (["--max-batch", "66"], "--max-batch"),
        (["--host", "127.0.0.1", "--port", "x"], "invalid int value"),
        (["--method", "magic"], "unknown method"),
    ],
)
def test_serve_options(capsys, argv, needle):
    from skipjack.cli import main

    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]


def test_load_1000_requests_16_concurrent(tiny_folder):
    """1,000 requests from 16 clients at once, mixing methods, streaming and not: no 5xx (no error at all), and
    every greedy response equals the same request decoded alone (q4: the forward is batch-invariant, so
    speculation is token-identical to plain)."""
    from concurrent.futures import ThreadPoolExecutor

    engine = Engine.load(str(tiny_folder), "q4", tune=False)
    prompts = [
        "the quick brown fox",
        "def add ( a , b )",
        "hello world this is",
        "stop here please and then",
        "héllo wörld 日本語",
        "naïve café 🙂",
        "jumps over the lazy dog",
        "return a + b",
    ]
    lengths = (4, 9, 16)
    expected = {(p, n): alone(engine, p, n) for p in prompts for n in lengths}
    methods = ["plain", "pld", "ngram", "pld:k=3", "off", "auto"]
    app = create_app(Settings(max_queue=64), engine)

    def one(i: int, u: str) -> tuple[int, bool]:
        p, n, m = prompts[i % len(prompts)], lengths[i % 3], methods[i % len(methods)]
        body = chat_args(p, n, speculative={"method": m}, stream=bool(i % 2))
        with httpx.Client(timeout=120) as c:
            if not body["stream"]:
                r = c.post(f"{u}/v1/chat/completions", json=body)
                return r.status_code, r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected[
                    (p, n)
                ]
            with c.stream("POST", f"{u}/v1/chat/completions", json=body) as r:
                chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
                text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
                return r.status_code, text == expected[(p, n)]

    with running(app) as u, ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: one(i, u), range(1000)))
    assert all(status == 200 for status, _ in results), sorted({s for s, _ in results})
    assert sum(ok for _, ok in results) == 1000


def _schema_check(op, mode, seen: list):
    from hypothesis import HealthCheck, given, settings

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=20, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def check(case):
        r = case.call(timeout=60)
        seen.append(r.status_code)
        assert r.status_code < 500, (op.label, r.text[:300])
        if r.status_code >= 400:
            assert "\n" not in r.json()["error"]["message"]

    return check


def test_schemathesis_finds_no_5xx(url):
    """Requests generated from the server's own OpenAPI schema, valid and invalid, against the running server:
    never a 5xx, and an error is one line of JSON. Bounded: 20 examples per operation and mode, no deadline."""
    import schemathesis
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    seen: list[int] = []
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            try:
                _schema_check(op, mode, seen)()
            except Unsatisfiable:  # no invalid request exists (a GET without parameters)
                assert mode == schemathesis.GenerationMode.NEGATIVE
    assert len(seen) > 100 and any(s == 200 for s in seen) and any(400 <= s < 500 for s in seen)


def test_kv_policy_per_request(url):
    """`"kv"` picks a request's cache policy: the reply says it is lossy; a bad spec or one that cannot combine
    with the method is a one-line 400."""
    ok = httpx.post(f"{url}/v1/chat/completions", json=chat_args("hello there", 6, kv="snapkv:budget=0.5"), timeout=60)
    assert ok.status_code == 200 and ok.json()["lossless"] is False
    full = httpx.post(f"{url}/v1/chat/completions", json=chat_args("hello there", 6, kv="full"), timeout=60)
    assert full.status_code == 200 and full.json()["lossless"] is True
    for kv, method in (("nope", "plain"), ("snapkv:budget=0", "plain"), ("tidal", "pld"), ("snapkv", "kangaroo")):
        bad = httpx.post(
            f"{url}/v1/chat/completions",
            json=chat_args("hello there", 6, kv=kv, speculative={"method": method}),
            timeout=60,
        )
        msg = bad.json()["error"]["message"]
        assert bad.status_code == 400 and "\n" not in msg, (kv, method, msg)


def superposed_alone(engine, text: str, n: int, k: int = 3, max_tokens: int = 8) -> list:
    """A superposed request's n completions through the engine directly."""
    tok = engine.tokenizer
    ids = tok.prompt_ids([{"role": "user", "content": text}])
    p = SamplingParams(max_new_tokens=max_tokens, stop_token_ids=tok.stop_ids)
    return engine.completions(Request(ids, p, f"superposed:k={k}", n=n))


def test_superposed_n_choices_whole_streamed_and_beside_a_batch(client, engine):
    """`n` with `superposed`: the n best drafts of one run are the choices (whole, or streamed: each choice
    whole at the end), labelled lossy; it runs beside other requests' batch (a plain one at the same time
    gives its own answer)."""
    from concurrent.futures import ThreadPoolExecutor

    text, spec = "the quick brown fox", {"speculative": {"method": "superposed:k=3"}}
    want = superposed_alone(engine, text, 3)
    with ThreadPoolExecutor(2) as pool:
        other = pool.submit(client.chat.completions.create, **chat_args("hello world this is", 16))
        r = client.chat.completions.create(**chat_args(text, 8, n=3, logprobs=True, top_logprobs=2), extra_body=spec)
        assert other.result().choices[0].message.content == alone(engine, "hello world this is", 16)
    assert [c.message.content for c in r.choices] == [w.text for w in want] and len(r.choices) == 3
    assert r.model_extra["lossless"] is False and r.model_extra["method"] == "superposed:k=3"
    assert r.usage.completion_tokens == sum(w.new_tokens for w in want)
    for c, w in zip(r.choices, want):  # each token's logprob under the model, from the scoring pass
        assert sum(x.logprob for x in c.logprobs.content) == pytest.approx(w.logprob, abs=1e-4)
    two = client.chat.completions.create(**chat_args(text, 8, n=2, stream=True), extra_body=spec)
    got = {}
    for chunk in two:
        for ch in chunk.choices:
            got[ch.index] = got.get(ch.index, "") + (ch.delta.content or "")
    assert [got[0], got[1]] == [w.text for w in want[:2]]


def test_superposed_contradictions_are_400s(url):
    body = chat_args("the quick brown fox", 8) | {"speculative": {"method": "superposed:k=3"}}
    for extra, needle in (({"n": 4}, "n = 4 completions, but k = 3"), ({"temperature": 1.0}, "temperature 0")):
        r = httpx.post(f"{url}/v1/chat/completions", json=body | extra)
        assert r.status_code == 400 and needle in r.json()["error"]["message"]
        assert "\n" not in r.json()["error"]["message"]
