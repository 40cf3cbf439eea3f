"""Structured output through the server and the CLI (issue 37): OpenAI's `response_format` (json_object,
json_schema) with the official client, streamed and whole; llama-server's `json_schema` and `grammar`; hostile
schemas and grammars are one-line 400s and the server keeps serving; on the real model, a constrained answer
parses and validates against its schema, and constrained speculation gives constrained plain's tokens at q4."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import jsonschema
import llguidance as llg
import pytest
from test_server import running

from skipjack.decoding.constraint import Grammar, llg_tokenizer
from skipjack.decoding.sampling import SamplingParams
from skipjack.engine import Engine, Request
from skipjack.server.app import Settings, create_app

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
MSGS = [{"role": "user", "content": "Describe a person named Bob, aged 40, as JSON."}]


@pytest.fixture(scope="module")
def engine(tiny_folder):
    return Engine.load(str(tiny_folder), "fp32", tune=False)


@pytest.fixture(scope="module")
def url(engine):
    with running(create_app(Settings(method="pld"), engine)) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def obeys(engine, grammar: Grammar, text: str) -> bool:
    """The text is a prefix the grammar allows (a random tiny model rarely finishes within its tokens)."""
    vocab = engine.model.lm_head.out_features
    m = llg.LLMatcher(llg_tokenizer(engine.tokenizer, vocab, engine.tokenizer.stop_ids), grammar.text(), log_level=0)
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    return m.try_consume_tokens(ids) == len(ids) or m.is_accepting()


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_with_the_openai_client(engine, client, stream):
    formats = [
        ({"type": "json_object"}, Grammar("json_object")),
        (
            {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": True}},
            Grammar.schema(SCHEMA),
        ),
    ]
    for fmt, grammar in formats:
        r = client.chat.completions.create(
            model=None, messages=MSGS, max_tokens=24, temperature=0, response_format=fmt, stream=stream
        )
        text = (
            "".join(c.choices[0].delta.content or "" for c in r if c.choices)
            if stream
            else r.choices[0].message.content
        )
        assert text.lstrip().startswith("{") and obeys(engine, grammar, text), text


@pytest.mark.parametrize("stream", [False, True])
def test_responses_text_format_with_the_openai_client(engine, client, url, stream):
    """The Responses API's `text.format` (json_object; json_schema with its schema flat in the format) is
    decoded under the grammar; a json_schema without a schema, or a bad one, is a one-line 400."""
    formats = [
        ({"type": "json_object"}, Grammar("json_object")),
        ({"type": "json_schema", "name": "p", "schema": SCHEMA, "strict": True}, Grammar.schema(SCHEMA)),
    ]
    for fmt, grammar in formats:
        r = client.responses.create(
            model=None,
            input=MSGS[0]["content"],
            max_output_tokens=24,
            temperature=0,
            text={"format": fmt},
            stream=stream,
        )
        text = "".join(ev.delta for ev in r if ev.type == "response.output_text.delta") if stream else r.output_text
        assert text.lstrip().startswith("{") and obeys(engine, grammar, text), text
    for fmt in ({"type": "json_schema", "name": "p"}, {"type": "json_schema", "name": "p", "schema": {"type": 3}}):
        bad = httpx.post(f"{url}/v1/responses", json={"input": "x", "text": {"format": fmt}}, timeout=60)
        assert bad.status_code == 400 and "\n" not in bad.json()["error"]["message"], bad.text


def test_llama_server_fields_and_hostile_input(url, engine):
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 6, "grammar": 'root ::= "yes" | "no"'})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] in ("yes", "no"), ok.text
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 8, "json_schema": SCHEMA})
    assert ok.status_code == 200 and obeys(engine, Grammar.schema(SCHEMA), ok.json()["choices"][0]["text"])
    deep = json.loads('{"type": "object", "properties": {"a": ' * 40 + '{"type": "integer"}' + "}}" * 40)
    hostile = [
        {"response_format": {"type": "json_schema"}},
        {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
        {"response_format": {"type": "xml"}},
        {"json_schema": deep},
        {"json_schema": {"type": "object", "properties": {f"k{i}": {"type": "string"} for i in range(5000)}}},
        {"json_schema": [1, 2]},
        {"grammar": "root ::= ("},
        {"grammar": "root ::= root"},  # no finite string: never terminates
        {"grammar": ""},
        {"grammar": 'root ::= "a"', "json_schema": SCHEMA},
        {"grammar": 'root ::= "a"', "ignore_eos": True},
    ]
    for extra in hostile:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 4} | extra, timeout=60)
        assert r.status_code in (400, 413), (str(extra)[:80], r.text[:200])
        assert "\n" not in r.json()["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 200


def test_cli_json_schema_and_grammar(tiny_folder, tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps(SCHEMA))
    base = [sys.executable, "-m", "skipjack.cli", "generate", "--model", str(tiny_folder), "--no-tune", "--raw"]
    done = subprocess.run(
        base + ["-n", "6", "--grammar", 'root ::= "yes" | "no"', "hi"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip() in ("yes", "no"), done.stderr
    for argv, says in [
        (["--json-schema", "{nope"], "not valid JSON"),
        (["--json-schema", f"@{tmp_path / 'missing.json'}"], "missing.json"),
        (["--grammar", "root ::= ("], "not valid"),
        (["--grammar", "x", "--json-schema", f"@{schema}"], "use one"),
    ]:
        bad = subprocess.run(base + argv + ["hi"], capture_output=True, text=True)
        assert bad.returncode == 2 and says in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


@pytest.mark.real
def test_real_model_json_schema_parses_and_speculation_is_exact():
    from skipjack.loading.load import DEFAULT_MODEL

    e = Engine.load(DEFAULT_MODEL)
    ids = e.tokenizer.prompt_ids(MSGS)
    params = SamplingParams(max_new_tokens=64, stop_token_ids=e.tokenizer.stop_ids)
    outs = {m: e.complete(Request(ids, params, m, grammar=Grammar.schema(SCHEMA))) for m in ("plain", "pld", "auto")}
    doc = json.loads(outs["plain"].text)
    jsonschema.validate(doc, SCHEMA)
    assert outs["pld"].tokens == outs["plain"].tokens == outs["auto"].tokens
    assert outs["auto"].forward_passes < outs["plain"].forward_passes  # jump-forward drafts were accepted


LLAMA_CPP_CASES = [  # llama.cpp's tools/server/tests/unit/test_chat_completion.py::test_completion_with_response_format
    ({"type": "json_object", "schema": {"const": "42"}}, 6, '"42"'),
    ({"type": "json_object", "schema": {"items": [{"type": "integer"}]}}, 10, "[ -3000 ]"),
    ({"type": "json_schema", "json_schema": {"schema": {"const": "foooooo"}}}, 10, '"foooooo"'),
    ({"type": "json_object"}, 10, "(\\{|John)+"),
    ({"type": "sound"}, 0, None),
    ({"type": "json_object", "schema": 123}, 0, None),
    ({"type": "json_object", "schema": {"type": 123}}, 0, None),
    ({"type": "json_object", "schema": {"type": "hiccup"}}, 0, None),
]


def test_llama_cpp_servers_response_format_cases_on_the_real_model():
    """llama.cpp's own server test, its cases and checks as written there (a regex search over the content; a
    400 with an error for the invalid ones), against skipjack serving SmolLM2."""
    import re

    from skipjack.loading.load import DEFAULT_MODEL

    with running(create_app(Settings(method="auto"), Engine.load(DEFAULT_MODEL))) as u:
        for fmt, n, pattern in LLAMA_CPP_CASES:
            msgs = [
                {"role": "system", "content": "You are a coding assistant."},
                {"role": "user", "content": "Write an example"},
            ]
            body = {"max_tokens": n, "messages": msgs, "response_format": fmt}
            r = httpx.post(f"{u}/chat/completions", json=body, timeout=120)
            if pattern is None:
                assert r.status_code == 400 and "error" in r.json(), (fmt, r.text[:200])
            else:
                assert r.status_code == 200, (fmt, r.text[:200])
                content = r.json()["choices"][0]["message"]["content"]
                assert re.search(pattern, content, re.DOTALL), (fmt, content)
        # as llama-server, the OpenAI routes answer without /v1 too (and stay out of the schema)
        assert httpx.get(f"{u}/models").json()["data"][0]["id"] == DEFAULT_MODEL
        done = httpx.post(f"{u}/completions", json={"prompt": "1, 2, 3,", "max_tokens": 2}, timeout=60)
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 2
        assert len(httpx.post(f"{u}/embeddings", json={"input": "x"}).json()["data"][0]["embedding"]) > 0
        paths = httpx.get(f"{u}/openapi.json").json()["paths"]
        assert "/v1/chat/completions" in paths and "/chat/completions" not in paths


def test_constrained_requests_in_a_batch_give_their_tokens_alone(engine):
    """In the server's batch (verify passes shared, drafts cut by each request's own grammar, some to nothing)
    each constrained request decodes as it does alone."""
    tok = engine.tokenizer
    params = SamplingParams(max_new_tokens=24, stop_token_ids=tok.stop_ids)
    grammars = [Grammar.schema(SCHEMA), Grammar("json_object"), Grammar("gbnf", 'root ::= ("ab" | "ba")+ "."'), None]
    reqs = [Request(tok.encode(f"item {i}: "), params, "pld", grammar=g) for i, g in enumerate(grammars)]
    alone = [engine.complete(Request(list(r.prompt), params, "pld", grammar=r.grammar)).tokens for r in reqs]
    assert [r.tokens for r in engine.generate_batch(reqs)] == alone
