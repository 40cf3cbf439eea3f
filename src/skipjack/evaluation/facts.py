"""An offline factual question set with one right answer per item, made from maintained data packages (never
from a benchmark's texts): `countryinfo` (countries -> capitals) and `periodictable` (elements -> symbols and
atomic numbers). Every item also has three distractors of its own kind (other capitals, symbols, numbers), chosen
and placed by the item's index, for multiple choice.

How a method is scored (`answer`, `choice`):
- **exact match**: greedy decoding after a two-example prompt, cut at the first newline; right when it equals the
  answer (case and surrounding white space ignored);
- **multiple choice**: each option's summed log-probability as a continuation of the prompt, or under a lossy
  layer strategy its own scores summed as they are (log q_N - log q_M for DoLa; teacher-forced as it decodes,
  the token after the prompt its own), with the plausibility constraint off: what DoLa's code does for
  TruthfulQA's multiple choice (`relative_top=0`, no softmax after the contrast).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from skipjack.evaluation.common import continuation_logprobs

SHOTS = {
    "capital": "Q: What is the capital of Belgium?\nA: Brussels\n\nQ: What is the capital of Kenya?\nA: Nairobi\n\n",
    "symbol": "Q: What is the chemical symbol of sodium?\nA: Na\n\nQ: What is the chemical symbol of lead?\nA: Pb\n\n",
    "number": "Q: What is the atomic number of iron?\nA: 26\n\nQ: What is the atomic number of neon?\nA: 10\n\n",
}
QUESTION = {
    "capital": "What is the capital of {}?",
    "symbol": "What is the chemical symbol of {}?",
    "number": "What is the atomic number of {}?",
}
SHOWN = {"Belgium", "Kenya", "sodium", "lead", "iron", "neon"}  # the worked examples are not items


@dataclass(frozen=True)
class Fact:
    kind: str  # capital | symbol | number
    subject: str
    answer: str
    choices: tuple[str, ...]  # four options, the answer among them
    gold: int  # the answer's index in `choices`

    @property
    def prompt(self) -> str:
        return SHOTS[self.kind] + "Q: " + QUESTION[self.kind].format(self.subject) + "\nA:"


@functools.cache
def _pairs() -> dict[str, list[tuple[str, str]]]:
    import countryinfo
    import periodictable

    pairs = [(c.name(), c.capital()) for c in countryinfo.all_countries()]
    capitals = sorted({(n, c) for n, c in pairs if isinstance(c, str) and c and n != c})  # one capital named
    elements = [e for e in periodictable.elements if e.number > 0]
    return {
        "capital": capitals,
        "symbol": [(e.name, e.symbol) for e in elements],
        "number": [(e.name, str(e.number)) for e in elements],
    }


def facts(kinds: tuple[str, ...] = ("capital", "symbol", "number"), every: int = 1) -> list[Fact]:
    """The items (every `every`-th of each kind), distractors from the same kind's other answers."""
    out = []
    for kind, pairs in _pairs().items():
        if kind not in kinds:
            continue
        pairs = [(s, a) for s, a in pairs if s not in SHOWN]
        answers = sorted({a for _, a in pairs})
        for i, (subject, answer) in enumerate(pairs[::every]):
            others = [a for a in answers if a != answer]
            picks = [others[(i * 7 + k * 13) % len(others)] for k in range(3)]
            gold = i % 4
            out.append(Fact(kind, subject, answer, tuple(picks[:gold] + [answer] + picks[gold:]), gold))
    return out


def right(text: str, fact: Fact) -> bool:
    """Exact match: the first line of the answer, case and surrounding white space ignored."""
    return text.strip().split("\n")[0].strip().lower() == fact.answer.lower()


@torch.inference_mode()
def choice(model, strategy, tokenizer, fact: Fact) -> int:
    """The option of largest summed log-probability under the method (`strategy`: None for plain)."""
    if strategy is not None and hasattr(strategy, "alpha"):
        strategy.alpha = 0.0  # no plausibility constraint for multiple choice (see the module's docstring)
    prompt = tokenizer.encode(fact.prompt)
    conts = [tokenizer.encode(fact.prompt + " " + option)[len(prompt) :] for option in fact.choices]
    held = model.make_cache(len(prompt) + max(map(len, conts)) + 1)  # the prompt but its last token, run once
    model(torch.tensor([prompt[:-1]]), held, logits="none")
    scores = []
    for cont in conts:
        lp = continuation_logprobs(model, strategy, prompt, cont, raw=True, held=held)  # [C, V]
        scores.append(float(lp[torch.arange(len(cont)), torch.tensor(cont)].sum()))
    return max(range(len(scores)), key=scores.__getitem__)
