"""Tools (issue 37): rendered by the model's own template (or described in a system message where it has no
place for them), calls read into `tool_calls` with finish reason "tool_calls", whole and streamed with the
official client; `tool_choice` required or named constrains the output to valid calls (a grammar); earlier
calls and tool results are accepted as messages; bad tool definitions are one-line 400s."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from conftest import tiny_engine
from test_server import running

from skipjack.server import protocol as P
from skipjack.server import tools
from skipjack.server.app import Settings, create_app

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
ASK = [{"role": "user", "content": "What's the weather like in Paris today?"}]


def body(**kw) -> P.Chat:
    return P.Chat.model_validate({"messages": ASK, "tools": TOOLS} | kw)


def test_parse_reads_blocks_and_bare_calls():
    names = {"get_weather", "get_time"}
    text = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = tools.parse(text, names)
    assert content == "Sure." and len(calls) == 1 and calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert calls[0]["id"].startswith("call_")
    two = '[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "x"}}]'
    assert [c["function"]["name"] for c in tools.parse(two, names)[1]] == ["get_time", "get_weather"]
    for plain in ["Just text.", '{"name": "rm_rf", "arguments": {}}', "<tool_call>{not json}</tool_call>"]:
        assert tools.parse(plain, names) == (plain, [])


def test_prepare_renders_arguments_as_objects_and_describes_tools_where_the_template_cannot():
    msgs = [
        ASK[0],
        {"role": "assistant", "content": None, "tool_calls": [_call("c1", "get_time", "{}")]},
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
    ]
    b = P.Chat.model_validate({"messages": msgs, "tools": TOOLS})
    out, fs = tools.prepare(b, P.messages(b), "{{ tools }}{{ messages }}")
    assert fs[0]["function"]["name"] == "get_weather" and out[1]["tool_calls"][0]["function"]["arguments"] == {}
    out, fs = tools.prepare(b, P.messages(b), "{{ messages }}")
    assert fs is None and out[0]["role"] == "system" and "get_weather" in out[0]["content"]
    none = P.Chat.model_validate({"messages": ASK, "tools": TOOLS, "tool_choice": "none"})
    assert tools.prepare(none, P.messages(none), "{{ tools }}") == (P.messages(none), None)


def _call(i, name, args):
    return {"id": i, "type": "function", "function": {"name": name, "arguments": args}}


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    """A tiny q4 model with the byte-level test tokenizer (a template without tools) and room for the tools'
    description."""
    with tiny_engine(tmp_path_factory.mktemp("home")) as e, running(create_app(Settings(method="pld"), e)) as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


@pytest.mark.parametrize("stream", [False, True])
def test_required_and_named_choices_always_give_valid_calls(client, stream):
    """Even a random tiny model calls a tool correctly when the grammar holds it to the call format (one line:
    white space is one optional space, so a model cannot spin in it)."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        r = client.chat.completions.create(
            model=None,
            messages=ASK,
            tools=TOOLS,
            tool_choice=choice,
            parallel_tool_calls=False,
            max_tokens=250,
            temperature=0,
            stream=stream,
        )
        if stream:
            chunks = [c.choices[0] for c in r if c.choices]
            calls = [tc for c in chunks for tc in c.delta.tool_calls or ()]
            finish = chunks[-1].finish_reason
        else:
            calls, finish = r.choices[0].message.tool_calls or [], r.choices[0].finish_reason
        assert finish == "tool_calls" and len(calls) == 1
        fn = calls[0].function
        assert fn.name in ("get_weather", "get_time") and (choice == "required" or fn.name == "get_weather")
        if fn.name == "get_weather":
            jsonschema.validate(json.loads(fn.arguments), WEATHER)


def test_tool_messages_are_accepted_and_bad_tools_are_400s(url):
    turn = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [_call("c1", "get_weather", '{"city": "Paris"}')]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temperature": 21}'},
    ]
    ok = httpx.post(f"{url}/v1/chat/completions", json={"messages": turn, "tools": TOOLS, "max_tokens": 4})
    assert ok.status_code == 200, ok.text
    fn = {"name": "f", "parameters": {"type": "object"}}
    bad = [
        {"tools": [{"type": "function"}]},
        {"tools": [{"type": "retrieval", "function": fn}]},
        {"tools": [{"type": "function", "function": {"name": "has space"}}]},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]},
        {"tools": [{"type": "function", "function": fn}] * 129},
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tools": TOOLS, "tool_choice": "sometimes"},
        {
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
            "tool_choice": "required",
        },
        {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
        {"messages": [{"role": "assistant", "content": None}]},
        {"messages": [{"role": "tool", "content": None}]},
    ]
    for extra in bad:
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": ASK, "max_tokens": 4} | extra)
        assert r.status_code == 400, (str(extra)[:100], r.text[:200])
        assert "\n" not in r.json()["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 200
