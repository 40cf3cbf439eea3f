"""Tools (OpenAI function calling) through the model's own chat template.

- The `tools` go to the chat template, as transformers' `apply_chat_template(tools=...)` passes them (Qwen2.5,
  Llama 3, Hermes templates render them). A template that does not mention tools gets them in a system message
  that describes each function and the call format, so every model can call tools.
- Calls are read from the output in the Hermes format these templates teach: `<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>` blocks (several allowed), or an answer that is only such an object (or a
  list of them), as small models often write it. Each becomes a `tool_calls` entry (an id, the name,
  the arguments as JSON text) and the finish reason is "tool_calls"; the text outside the blocks is the content.
- `tool_choice`: "auto" (the model decides), "none" (no tools rendered, no calls read), "required" or a named
  function: the output is constrained by a grammar (`decoding.constraint`) to one or more calls (one with
  `parallel_tool_calls: false`) whose arguments obey the function's parameter schema, so the call always
  parses. Speculation stays exact under it, as under any grammar.
- Earlier turns: an assistant message's `tool_calls` (arguments as JSON text) reach the template with their
  arguments as objects (as the templates expect); `role: "tool"` messages carry the results.
"""

from __future__ import annotations

import json
import re
import uuid

from skipjack.decoding.constraint import Grammar
from skipjack.errors import SkipjackError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
CALL = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)


def active(body) -> bool:
    """Whether the request offers tools the model may call."""
    return bool(body.tools) and body.tool_choice != "none"


def functions(body) -> list[dict]:
    """The offered functions, as the templates take them ({"type": "function", "function": {...}})."""
    out = []
    for t in body.tools or ():
        f = {"name": t.function.name, "description": t.function.description or ""}
        f["parameters"] = t.function.parameters if t.function.parameters is not None else {"type": "object"}
        out.append({"type": "function", "function": f})
    return out


def chosen(body) -> list[dict]:
    """The functions a call may name: the named one under a named `tool_choice`, else all."""
    fs = functions(body)
    choice = body.tool_choice
    if choice is None or isinstance(choice, str):
        return fs
    named = [f for f in fs if f["function"]["name"] == choice.function.name]
    if not named:
        raise SkipjackError(f"tool_choice names {choice.function.name!r}, which is not among the tools")
    return named


def instructions(fs: list[dict]) -> str:
    """A system message for a template without tools: the functions and the call format."""
    listing = "\n".join(json.dumps(f["function"], ensure_ascii=False) for f in fs)
    return (
        "You may call functions to help with the user's request. The functions, as JSON:\n"
        f"{listing}\n"
        f'To call one, answer with {OPEN}{{"name": <function name>, "arguments": <arguments object>}}{CLOSE}, '
        "one block per call."
    )


def prepare(body, messages: list[dict], template: str) -> tuple[list[dict], list[dict] | None]:
    """(the messages for the template, the tools for the template or None): earlier calls' arguments as objects;
    tools in a system message when the template has no place for them."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = m | {"tool_calls": [_as_object(c) for c in m["tool_calls"]]}
        out.append(m)
    if not active(body):
        return out, None
    fs = chosen(body)
    if "tools" in template:
        return out, fs
    text = instructions(fs)
    if out and out[0]["role"] == "system":
        return [out[0] | {"content": f"{out[0]['content']}\n\n{text}"}] + out[1:], None
    return [{"role": "system", "content": text}] + out, None


def _as_object(call: dict) -> dict:
    f = call["function"]
    try:
        args = json.loads(f["arguments"])
    except ValueError:
        args = f["arguments"]  # not JSON: passed on as the client sent it
    return call | {"function": {"name": f["name"], "arguments": args}}


def grammar(body, tokenizer) -> Grammar | None:
    """Under `tool_choice` "required" or a named function: the output is one or more calls (one only with
    `parallel_tool_calls: false`), each naming an offered function with arguments obeying its parameters. Where
    the tokenizer has `<tool_call>` as one token (Qwen2.5), the grammar names that token, as the model writes it."""
    if not active(body) or body.tool_choice in (None, "auto"):
        return None
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": f["function"]["name"]}, "arguments": f["function"]["parameters"]},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in chosen(body)
    ]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = json.dumps(schema | {"x-guidance": {"whitespace_pattern": " ?"}})  # one line, as the format is
    more = ' ("\\n" call)*' if body.parallel_tool_calls else ""
    o, c = (t if len(tokenizer.encode(t, add_special_tokens=False)) == 1 else f'"{t}"' for t in (OPEN, CLOSE))
    return Grammar("lark", f'start: call{more}\ncall: {o} "\\n" %json {schema} "\\n" {c}')


def parse(text: str, names: set[str]) -> tuple[str | None, list[dict]]:
    """(the content outside the calls or None, the calls) from the output; a block that is not a call of an
    offered function stays in the content."""
    calls, kept, at = [], [], 0
    for m in CALL.finditer(text):
        try:
            doc = json.loads(m.group(1))
        except ValueError:
            continue
        if not isinstance(doc, dict) or doc.get("name") not in names:
            continue
        args = doc.get("arguments", doc.get("parameters", {}))
        calls.append(
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": doc["name"], "arguments": json.dumps(args, ensure_ascii=False)},
            }
        )
        kept.append(text[at : m.start()])
        at = m.end()
    kept.append(text[at:])
    if not calls:  # no blocks: a whole answer that is a call object (or a list of them) is one too
        try:
            doc = json.loads(text)
        except ValueError:
            return text, []
        docs = doc if isinstance(doc, list) else [doc]
        if docs and all(isinstance(d, dict) and d.get("name") in names for d in docs):
            return parse("".join(f"{OPEN}{json.dumps(d)}{CLOSE}" for d in docs), names)
        return text, []
    content = "".join(kept).strip()
    return (content or None), calls
