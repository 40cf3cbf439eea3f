"""Tools on a real model (issue 37): Qwen2.5-Coder's own template renders the tools, and with tool_choice auto
the model itself decides to call. A module of its own: `test_tools`' tiny server points SKIPJACK_HOME at a
temporary folder for the module's duration, where Qwen's converted blocks are not cached."""

from __future__ import annotations

import json

import pytest
from test_server import running
from test_tools import ASK, TOOLS

from skipjack.engine import Engine
from skipjack.server.app import Settings, create_app


@pytest.mark.real
def test_qwen_calls_a_tool_through_its_template():
    """Qwen2.5-Coder's template has tools: with tool_choice auto the model itself decides to call (streaming is
    checked on the tiny model above)."""
    from openai import OpenAI

    e = Engine.load("qwen2.5-coder-0.5b", tune=False)
    with running(create_app(Settings(method="pld"), e)) as u:  # auto would search swift's layers first
        c = OpenAI(base_url=f"{u}/v1", api_key="none", max_retries=0)
        r = c.chat.completions.create(model=None, messages=ASK, tools=TOOLS, max_tokens=60, temperature=0)
        calls, finish = r.choices[0].message.tool_calls, r.choices[0].finish_reason
        assert finish == "tool_calls" and calls[0].function.name == "get_weather"
        assert json.loads(calls[0].function.arguments)["city"] == "Paris"
