"""One plan per request: methods parsed without being built, the rules over declared capabilities, and nothing
in a request's path that loads a model or writes a measurement file."""

from __future__ import annotations

import pytest
from conftest import tiny_engine

from skipjack.decoding.plan import RULES, resolve
from skipjack.decoding.sampling import SamplingParams
from skipjack.engine import Request
from skipjack.errors import SkipjackError
from skipjack.methods import REGISTRY, MethodSpec, method_help, method_names


@pytest.fixture()
def engine(tmp_path):
    with tiny_engine(tmp_path / "prepared", layers=4) as e:
        yield e


def test_validating_a_draft_model_spec_loads_nothing(monkeypatch, tmp_path):
    """`draft:model=NAME` is parsed (names, types, ranges) with no model, no file and no timing."""
    import skipjack.loading.load as load

    def refuse(*a, **k):
        raise AssertionError("parsing a method spec must not load a model")

    monkeypatch.setattr(load, "load", refuse)
    monkeypatch.setenv("SKIPJACK_HOME", str(tmp_path / "home"))
    for spec in ["draft:model=qwen2.5-coder-0.5b", "mix:of=pld+draft,model=qwen2.5-coder-0.5b", "kangaroo", "swift"]:
        m = MethodSpec.parse(spec)
        assert m.drafts and m.lossless
    assert not (tmp_path / "home").exists()  # nothing was written either


def test_parse_types_and_ranges():
    m = MethodSpec.parse("pld:k=8, max_ngram=4")
    assert (m.name, m.options, m.k) == ("pld", {"max_ngram": 4}, 8)
    assert MethodSpec.parse("ngram:explore=1,path=7,table=2").options == {"explore": 1.0, "path": "7", "table": "2"}
    assert MethodSpec.parse("plain").lossless and not MethodSpec.parse("plain").drafts
    assert not MethodSpec.parse("layer-skip:ratio=0.25").lossless
    for bad, message in [
        ("plain:k=1", "takes no options"),
        ("pld:k=65", "k \\(fixed draft length"),
        ("ngram:shared=1", "unknown option"),
        ("ngram:parts=1", "unknown option"),  # what the registry passes is never a user option
        ("mix:of=pld", "two or more"),
        ("mix:of=pld+mix", "two or more"),
        ("nothing", "unknown method"),
    ]:
        with pytest.raises(SkipjackError, match=message):
            MethodSpec.parse(bad)


def test_capabilities_come_from_the_classes_not_names():
    """A mix reads past keys only if a part does: `mix:of=pld+ngram` runs over an evicting cache."""
    assert not MethodSpec.parse("mix:of=pld+ngram").reads_past_keys
    assert MethodSpec.parse("mix:of=pld+kangaroo").reads_past_keys
    resolve("mix:of=pld+ngram", "h2o")
    resolve("swift", "h2o")  # its skip-set search runs at load, on a cache of its own
    with pytest.raises(SkipjackError, match="reads cached keys of past positions"):
        resolve("mix:of=pld+kangaroo", "h2o")
    resolve("kangaroo", "int8")  # keeps every key: an adapter pass may read them
    for name, cls in REGISTRY.items():
        if cls.reads_past_keys:
            with pytest.raises(SkipjackError, match="reads cached keys"):
                resolve(name, "snapkv")


@pytest.mark.parametrize(
    "method, kv, session, message",
    [
        ("layer-skip", "h2o", False, "do not combine"),
        ("plain", "h2o", True, "does not run with a session"),
        ("pld", "tidal", False, "runs plain steps only"),
        ("triforce", "int8", False, "full cache only"),
    ],
)
def test_one_table_of_rules(method, kv, session, message):
    with pytest.raises(SkipjackError, match=message):
        resolve(method, kv, session)
    resolve(method, None, session)  # with every key kept, each combines
    resolve(method, "full", session)


def test_rules_are_one_table():
    assert len(RULES) >= 4 and all(callable(refuses) and "{kv}" in message for refuses, message in RULES)


def test_help_comes_from_the_registry():
    text = method_help()
    assert all(name in text for name in method_names())
    assert "max_ngram" in text and "layer-skip" in text


def test_a_plan_per_request_and_its_lossless_answer(engine):
    e = engine
    p = e.plan(Request([1, 2, 3], SamplingParams(max_new_tokens=4), "pld"))
    assert p.lossless and p.draft is not None and p.policy is None
    q = e.plan(Request([1, 2, 3], SamplingParams(max_new_tokens=4), "pld"))
    assert q.draft is not p.draft  # one session per request, of one drafter
    assert not e.plan(Request([1, 2, 3], SamplingParams(max_new_tokens=4), "pld", kv="h2o")).lossless
    assert e.plan(Request([1, 2, 3], SamplingParams(max_new_tokens=4), "plain", kv="full")).lossless
    s = e.plan(Request([1, 2, 3], SamplingParams(max_new_tokens=4), "layer-skip"))
    t = e.plan(Request([1, 2, 3], SamplingParams(max_new_tokens=4), "layer-skip"))
    assert not s.lossless and s.strategy is not t.strategy  # a strategy's state is a request's own


def test_requests_write_no_measurement_file(engine, monkeypatch, tmp_path):
    """Every method prepared first (load time); then its requests leave SKIPJACK_HOME as it was."""
    e = engine
    specs = ["pld", "ngram", "swift", "del", "mix:of=pld+swift", "layer-skip"]
    for spec in specs:
        e.method(spec)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("SKIPJACK_HOME", str(home))
    for spec in specs:
        res = e.complete(Request([1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(max_new_tokens=12), spec))
        assert res.new_tokens == 12
    assert list(home.rglob("*")) == []


def test_the_server_prepares_its_method_at_start_and_reports_it_as_load_time(engine):
    """`skipjack serve --method swift`: the skip set is searched when the model is ready, before any request,
    and the time shows as load time (/health, /metrics); a request's handler only parses."""
    from fastapi.testclient import TestClient

    from skipjack.server.app import Settings, create_app

    before = engine.prepare_seconds
    with TestClient(create_app(Settings(method="swift"), engine)) as client:
        assert engine.prepare_seconds > before  # swift searched its skip set when the app started
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["load_seconds"] == round(engine.load_seconds, 3)
        assert "skipjack:load_seconds" in client.get("/metrics").text
