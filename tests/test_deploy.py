"""`skipjack.deploy`: replicas on Ray Serve. Without Ray: the prefix-aware routing, the board that replicas share,
the merged metrics and the application's options. With Ray (skipped, with the reason, where it cannot start): a
2-replica fleet of a tiny q4 model on loopback, 1 thread each, driven with the `openai` client and raw HTTP:
greedy identity to the engine, 200 mixed requests from 8 clients, a shared prefix kept on one replica, a replica
killed mid-load, and a rolling restart under load."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from skipjack.decoding.sampling import SamplingParams
from skipjack.deploy import routing
from skipjack.deploy.board import STALE, Board, take_files, tuning_files
from skipjack.errors import SkipjackError
from skipjack.server.metrics import Metrics, merge

HEAD = list(range(100, 120))  # a chat template's system prompt: the same first 20 tokens in every request


def route(table: routing.PrefixTable, ids: list[int], loads: dict[str, int], full: int = 8) -> str:
    ks = routing.keys(ids)
    best = routing.rank(ks, table.match(ks), loads, full, len(ids) / routing.BLOCK)[0]
    table.record(ks, best)
    return best


def test_a_conversation_stays_on_its_replica_and_new_ones_spread():
    """Each turn extends the last one's prompt: every turn goes where the first went, though all conversations
    share their first block (which alone would send them all to one replica); new ones go to the least loaded."""
    table, loads, where = routing.PrefixTable(), {"a": 0, "b": 0, "c": 0}, {}
    talks = {c: HEAD + [200 + c] * 30 for c in range(6)}
    assert len({routing.keys(t)[0] for t in talks.values()}) == 1  # the first block is the same for all
    for turn in range(4):
        for c, ids in talks.items():
            r = route(table, ids, loads)
            assert where.setdefault(c, r) == r
            if turn == 0:
                loads[r] += 1  # each conversation stays open on its replica
            talks[c] = ids + [300 + turn] * 20
    assert sorted(loads.values()) == [2, 2, 2]


def test_a_full_replica_falls_back_to_the_least_loaded():
    table = routing.PrefixTable()
    ids = HEAD + list(range(40))
    ks, n = routing.keys(ids), len(ids) / routing.BLOCK
    first = route(table, ids, {"a": 0, "b": 0})
    other = "b" if first == "a" else "a"
    assert routing.rank(ks, table.match(ks), {first: 8, other: 5}, 8, n) == [other, first]
    # within the slack the match wins over a lighter load; beyond it the load wins
    assert routing.rank(ks, table.match(ks), {first: 2, other: 0}, 8, n)[0] == first
    assert routing.rank(ks, table.match(ks), {first: 3, other: 0}, 8, n)[0] == other
    # a match of under half the prompt (the shared head alone) is worth less than balance
    longer = ids + list(range(200, 300))
    ks2 = routing.keys(longer)
    assert routing.rank(ks2, table.match(ks2), {first: 1, other: 0}, 8, len(longer) / routing.BLOCK)[0] == other


def test_a_forgotten_replica_moves_only_its_own_prefixes():
    table, loads = routing.PrefixTable(), {"a": 0, "b": 0, "c": 0}
    prompts = [list(range(i, i + 40)) for i in range(0, 400, 10)]
    before = {i: route(table, p, loads) for i, p in enumerate(prompts)}
    assert len(set(before.values())) == 3  # rendezvous hashing spreads idle ties
    table.forget("c")
    del loads["c"]
    after = {i: route(table, p, loads) for i, p in enumerate(prompts)}
    assert all(after[i] == r for i, r in before.items() if r != "c")
    assert {after[i] for i, r in before.items() if r == "c"} <= {"a", "b"}
    assert not any("c" in rs for rs in table.held.values())


def test_the_prefix_table_is_bounded():
    table = routing.PrefixTable(capacity=10)
    for i in range(20):
        table.record(routing.keys(list(range(i, i + 16))), "a")
    assert len(table.held) == 10 and table.match(routing.keys(list(range(19, 35)))) == {"a": 1}
    assert table.match(routing.keys(list(range(0, 16)))) == {}


def _metrics(method: str, steps: int) -> str:
    from skipjack.decoding.sequence import Step

    m = Metrics()
    m.first(40, Step([1], forward_tokens=24))
    for _ in range(steps):
        m.step(method, Step([1, 2], drafted=3, accepted=1), 0.01, first=False)
    m.requests.labels(method, "stop").inc()
    return m.text("tiny").decode()


def test_merged_metrics_label_each_replica_and_stay_valid():
    text = merge({"r1": _metrics("pld", 2), "r2": _metrics("plain", 3)})
    fams = {f.name: f for f in text_string_to_metric_families(text)}  # the parser refuses a family split in two
    tokens = {
        s.labels["replica"]: s.value for s in fams["skipjack:generation_tokens"].samples if s.name.endswith("_total")
    }
    assert tokens == {"r1": 4.0, "r2": 6.0}
    hits = [s for s in fams["vllm:prefix_cache_hits"].samples if s.name.endswith("_total")]
    assert {(s.labels["replica"], s.labels["model_name"], s.value) for s in hits} == {
        ("r1", "tiny", 16.0),
        ("r2", "tiny", 16.0),
    }


def test_the_board_merges_tables_drops_stale_metrics_and_hands_out_measurements():
    now = [0.0]
    b = Board(clock=lambda: now[0])
    b.publish("r1", "a 1\n")
    now[0] = STALE / 2
    b.publish("r2", "b 1\n")
    now[0] = STALE + 1
    assert b.metrics() == {"r2": "b 1\n"}  # r1 stopped publishing: it died
    first = b.merge("default/3", 3, [((5,), {7: 2.0}), ((5, 6), {8: 1.0})])
    again = b.merge("default/3", 3, [((5,), {7: 1.0, 9: 4.0})])
    assert dict(first) == {(5,): {7: 2.0}, (5, 6): {8: 1.0}}
    assert dict(again) == {(5,): {7: 2.0, 9: 4.0}, (5, 6): {8: 1.0}}  # max-merged: repeating it changes nothing
    assert dict(b.merge("default/3", 3, again)) == dict(again)
    assert b.claim("cpu|1", "r1") and not b.claim("cpu|1", "r2")
    b.add_files({"costs/" + "a" * 20 + ".json": "{}", "../etc/passwd": "x", "rows/x.json": "{}"})
    b.release("cpu|1", measured=True)
    assert b.claim("cpu|1", "r2") and b.claim("cpu|1", "r3")  # measured: nobody waits any more
    assert list(b.get_files()) == ["costs/" + "a" * 20 + ".json"]


def test_tuning_files_go_from_one_node_to_another(tmp_path, monkeypatch):
    """What a replica publishes after measuring, another node (another home folder) takes before it loads; only
    files named as `decoding.tuning` names them, and never over one it has."""
    name = "costs/" + "0" * 20 + ".json"
    (tmp_path / "a" / "costs").mkdir(parents=True)
    (tmp_path / "a" / name).write_text('{"measured": 1}')
    (tmp_path / "a" / "costs" / "other.json").write_text("{}")
    monkeypatch.setenv("SKIPJACK_HOME", str(tmp_path / "a"))
    published = tuning_files()
    assert published == {name: '{"measured": 1}'}
    monkeypatch.setenv("SKIPJACK_HOME", str(tmp_path / "b"))
    (tmp_path / "b" / "rows").mkdir(parents=True)
    (tmp_path / "b" / "rows" / ("1" * 20 + ".json")).write_text("mine")
    take_files(published | {"rows/" + "1" * 20 + ".json": "theirs", "../escape.json": "x"})
    assert tuning_files() == {name: '{"measured": 1}', "rows/" + "1" * 20 + ".json": "mine"}
    assert not (tmp_path / "escape.json").exists()


def test_options_from_serve_args():
    from skipjack.deploy.serving import options

    o = options({"replicas": "2", "max_replicas": "4", "threads": "1", "tune": "false", "routing": "random"})
    assert (o.replicas, o.max_replicas, o.threads, o.routing, o.settings.tune) == (2, 4, 1, "random", False)
    for bad in ({"replicas": "0"}, {"replicas": "2", "max_replicas": "1"}, {"max_batch": "x"}, {"nope": 1}):
        with pytest.raises(SkipjackError) as e:
            options(bad)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("argv", [["--replicas", "0"], ["--max-replicas", "3"], ["--replicas", "2", "--routing", "x"]])
def test_serve_replicas_bad_values_are_one_line(argv, capsys):
    from skipjack.cli import main

    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("skipjack: error:") and "\n" not in err


# ---- a fleet on Ray Serve, on loopback ----


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random Llama (q4 when loaded: batch-invariant) with the byte-level tokenizer and a context of 1024."""
    from conftest import byte_bpe_tokenizer, hf_model

    path = tmp_path_factory.mktemp("fleet-llama")
    tok = byte_bpe_tokenizer()
    model = hf_model("llama", seed=3, vocab=len(tok), max_position_embeddings=1024)
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


ARGS = {"dtype": "q4", "replicas": 2, "threads": 1, "tune": False, "share": 1, "drain": 20, "max_batch": 4}


@pytest.fixture(scope="module")
def fleet(folder):
    """A 2-replica fleet; skipped with Ray's own reason where Ray cannot start."""
    ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install 'skipjack[ray]')")
    from ray import serve

    from skipjack.deploy.serving import APP, application, options

    try:
        ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    except Exception as e:  # a sandbox without shared memory or local sockets
        pytest.skip(f"Ray cannot start here: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(options({"model": str(folder)} | ARGS)), name=APP, route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "ray": ray, "serve": serve, "args": {"model": str(folder)} | ARGS}
    finally:
        ray.shutdown()  # the local cluster and every replica with it (no graceful drain to wait for)


@pytest.fixture(scope="module")
def engine(folder):
    from skipjack.engine import Engine

    return Engine.load(str(folder), "q4", tune=False)


def per_replica(url: str, name: str = "skipjack:request_success_total") -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name == name:
                out[s.labels.get("replica", "")] = out.get(s.labels.get("replica", ""), 0.0) + s.value
    return out


def settled(url: str, total: float | None = None, name: str = "skipjack:request_success_total") -> dict[str, float]:
    """The replicas' counts once they add up to `total`, or (None) once they stop changing (replicas publish their
    metrics every second)."""
    end, last = time.monotonic() + 30, None
    while time.monotonic() < end:
        got = per_replica(url, name)
        if (sum(got.values()) >= total) if total is not None else got == last:
            return got
        last = got
        time.sleep(0.3 if total is not None else 1.2)
    return got


def test_the_fleet_gives_the_engines_greedy_tokens(fleet, engine):
    from openai import OpenAI

    client = OpenAI(base_url=f"{fleet['url']}/v1", api_key="none", max_retries=0)
    tok = engine.tokenizer
    for i, method in enumerate(["plain", "pld", "ngram", "auto"]):
        text = f"the quick brown fox {i} jumps over the lazy dog and the fox"
        ids = tok.prompt_ids([{"role": "user", "content": text}])
        want = engine.complete(engine_request(ids, 12, method, tok.stop_ids)).text
        got = client.chat.completions.create(
            model=None, messages=[{"role": "user", "content": text}], max_tokens=12, temperature=0,
            extra_body={"speculative": {"method": method}},
        )  # fmt: skip
        assert got.choices[0].message.content == want
        parts = client.completions.create(model=None, prompt=text, max_tokens=12, temperature=0, stream=True)
        raw = engine.complete(engine_request(tok.prompt_ids(text, raw=True), 12, "plain", tok.stop_ids)).text
        assert "".join(c.choices[0].text for c in parts) == raw
    text, spec = "the quick brown fox", {"speculative": {"method": "superposed:k=3"}}  # one run, n choices
    ids = tok.prompt_ids([{"role": "user", "content": text}])
    want = engine.completions(engine_request(ids, 8, "superposed:k=3", tok.stop_ids, n=3))
    msgs = [{"role": "user", "content": text}]
    got = client.chat.completions.create(model=None, messages=msgs, max_tokens=8, temperature=0, n=3, extra_body=spec)
    assert [c.message.content for c in got.choices] == [w.text for w in want]


def engine_request(ids, tokens, method, stop_ids, n=1):
    from skipjack.request import Request

    return Request(ids, SamplingParams(max_new_tokens=tokens, stop_token_ids=stop_ids), method, n=n)


def _call(url: str, i: int) -> int:
    """One of the mixed requests: chat or completion, streamed or whole, by method; its status (an SSE error
    event counts as its code)."""
    method = ["plain", "pld", "ngram", "auto"][i % 4]
    body = {"max_tokens": 4 + i % 5, "temperature": 0 if i % 3 else 0.7, "seed": i, "speculative": {"method": method}}
    path = "/v1/chat/completions" if i % 2 else "/v1/completions"
    body |= {"messages": [{"role": "user", "content": f"hello world {i}"}]} if i % 2 else {"prompt": f"def add {i}"}
    return _send(url + path, body | {"stream": i % 4 < 2})


def _send(url: str, body: dict) -> int:
    with httpx.Client(timeout=120) as c:
        if not body.get("stream"):
            return c.post(url, json=body).status_code
        with c.stream("POST", url, json=body) as r:
            for line in r.iter_lines():
                if line.startswith('data: {"error"'):
                    return json.loads(line[6:])["error"]["code"]
            return r.status_code


def test_200_mixed_requests_from_8_clients_get_no_5xx(fleet):
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda i: _call(fleet["url"], i), range(200)))
    assert codes == [200] * 200
    end = time.monotonic() + 20  # the replicas' n-gram tables (method auto and ngram) meet on the board
    while sum(per_replica(fleet["url"], "skipjack:shared_ngram_contexts").values()) == 0:
        assert time.monotonic() < end, "no n-gram table was merged through the board"
        time.sleep(0.5)


def test_requests_with_a_shared_prefix_land_on_one_replica(fleet):
    url = fleet["url"]
    before = settled(url)
    doc = "the quick brown fox jumps over the lazy dog " * 6
    for q in range(5):
        body = {"prompt": f"{doc} question {q}:", "max_tokens": 3, "temperature": 0}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
    after = settled(url, sum(before.values()) + 5)
    grew = {r: n - before.get(r, 0) for r, n in after.items() if n > before.get(r, 0)}
    assert list(grew.values()) == [5.0]
    cached = per_replica(url, "skipjack:prefix_cache_hits_total")
    assert cached[next(iter(grew))] > 0  # the later ones started from the first one's keys


def _replicas(ray) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "#Replica#" in a["name"]]


def _load(url: str, n: int, clients: int) -> list[int]:
    def one(i: int) -> int:
        body = {"prompt": f"def add {i}", "max_tokens": 150, "temperature": 0, "ignore_eos": True}
        return _send(f"{url}/v1/completions", body | {"stream": i % 2 == 0})

    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(one, range(n)))


def lost(url: str) -> float:
    """The ingress's count of requests that failed because their replica died (not those sent again)."""
    fams = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text)
    return sum(s.value for f in fams for s in f.samples if s.name == "skipjack:replica_lost_requests_total"
               and s.labels.get("outcome") == "failed")  # fmt: skip


def test_a_killed_replica_fails_cleanly_and_is_replaced(fleet):
    """Requests on a replica killed mid-load: sent again where no step came back yet, else a clean 503 (an SSE
    error event once streaming), each counted; the rest finish; Serve starts a replacement, which serves."""
    ray, url = fleet["ray"], fleet["url"]
    names, failed = _replicas(ray), lost(url)
    result: list[int] = []
    load = threading.Thread(target=lambda: result.extend(_load(url, 24, 6)))
    load.start()
    time.sleep(1.0)
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    load.join(120)
    assert not load.is_alive() and len(result) == 24
    assert set(result) <= {200, 503} and result.count(503) == lost(url) - failed
    end = time.monotonic() + 90
    while not (_running(fleet["serve"]) == 2 and (new := set(_replicas(ray)) - set(names))):
        assert time.monotonic() < end, "no replacement replica is running"
        time.sleep(0.5)
    fresh = next(iter(new)).rsplit("#", 1)[-1]
    while settled(url).get(fresh, 0) == 0:  # the ingress hears of the new replica shortly after it runs
        assert time.monotonic() < end, "the replacement replica served nothing"
        _load(url, 6, 6)


def _running(serve) -> int:
    states = serve.status().applications["skipjack"].deployments["Replica"].replica_states
    return states.get("RUNNING", 0)


def test_a_rolling_restart_drops_no_request(fleet):
    from skipjack.deploy.serving import APP, application, options

    serve, url = fleet["serve"], fleet["url"]
    result: list[int] = []
    load = threading.Thread(target=lambda: result.extend(_load(url, 30, 4)))
    load.start()
    time.sleep(0.5)
    serve.run(application(options(fleet["args"] | {"share": 2})), name=APP, route_prefix="/")  # new replicas
    load.join(180)
    assert not load.is_alive() and result == [200] * 30
