"""Offline RULER-style synthetic long-context tasks (RULER, Hsieh et al. 2024), scored by string match.

- niah_single: a 7-digit pass key hidden at a seeded depth in a haystack; asked back.
- niah_multikey: four "special magic UUID for <word>" needles (three distractors; under 1024 tokens, one);
  one key's UUID asked.
- niah_multivalue: four magic numbers for one key; all four asked.
- vt (variable tracking): a chain VAR A = 12345, VAR B = VAR A, ... (4 hops) hidden in the haystack; every
  variable that holds the value asked.
- cwe (common-word extraction): a numbered list where 10 words appear many times and the rest rarely; the 10
  most common asked.

Haystacks: "repeat" (RULER's noise sentences, repeated) or "text" (local prose, then code: `texts.documents`).
The haystack (cwe: the list) is fitted by token count so that the prompt, through the chat template, has at
most `length` tokens and at least 95% of them. Everything is drawn from `random.Random` seeded by the task,
so a (tokenizer, length, seed) gives the same ids every time. Score (RULER's string_match_all): the share of
answers found in the output, case-insensitive.
"""

from __future__ import annotations

import math
import random
import re
import string
import uuid
from bisect import bisect_left
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate

from skipjack.errors import SkipjackError

KINDS = ("niah_single", "niah_multikey", "niah_multivalue", "vt", "cwe")
HAYSTACKS = ("repeat", "text")
NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
MIN_LENGTH = 256
TOLERANCE = 0.05  # the prompt has between (1 - TOLERANCE) * length and length tokens
NEEDLES = 4  # needles in niah_multikey (one asked, the rest distractors; 2 under 1024 tokens), niah_multivalue
HOPS = 4  # vt: a chain of HOPS + 1 variables
COMMON = 10  # cwe: the words to find
_BREAK = re.compile(r"[.!?]\s+$|\n")  # a haystack unit after which a needle may go: a sentence or line end
INTRO = {
    "niah_single": "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the pass key.",
    "niah_multikey": "Some special magic UUIDs are hidden within the following text. Make sure to memorize them. "
    "I will quiz you about the UUIDs afterwards.",
    "niah_multivalue": "Some special magic numbers are hidden within the following text. Make sure to memorize "
    "them. I will quiz you about the numbers afterwards.",
    "vt": "Memorize and track the chain of variable assignments hidden in the following text.",
}


@dataclass(frozen=True)
class LongTask:
    kind: str  # one of KINDS
    haystack: str  # "repeat" | "text" | "n/a" (cwe)
    length: int  # target prompt length in tokens
    seed: int  # the task's own seed: make_tasks' seed + its index among the n
    prompt: list[int]  # token ids, chat template applied
    answers: tuple[str, ...]  # every string the output must contain
    max_new: int  # tokens to generate: the answers' length and some room
    depth: float = 0.0  # where the asked needle sits in the haystack, 0 (start) .. 1 (end); cwe: 0


@lru_cache(maxsize=1)
def _words() -> tuple[str, ...]:
    """Plain lowercase words (4-10 letters) of the pydoc topics, sorted: keys for needles and cwe's words."""
    from pydoc_data.topics import topics

    return tuple(sorted(set(re.findall(r"(?<![\w.*`'])[a-z]{4,10}(?![\w(*`'])", " ".join(topics.values())))))


@lru_cache(maxsize=2)
def _units(haystack: str) -> tuple[str, ...]:
    """A haystack's units, small enough to fit any token budget closely (up to 8 characters and the space
    after them; joined, they give back the text): RULER's noise sentences, or the local prose then the code."""
    from skipjack.evaluation.texts import documents

    prose, code = documents()
    text = " ".join(NOISE) + " " if haystack == "repeat" else "".join(d.rstrip() + "\n\n" for d in prose + code)
    return tuple(re.findall(r"\S{1,8}\s{0,8}|\s{1,8}", text))


def _haystack(haystack: str, k: int, needles: list[tuple[float, str]]) -> str:
    """The first `k` units of a haystack (cycled) with each needle (depth in [0, 1], sentence) put in at the
    first sentence or line end from its depth on; needles at the same place keep their order."""
    src = _units(haystack)
    units, sep = [src[i % len(src)] for i in range(k)], " " if haystack == "repeat" else "\n"
    ends, places = list(accumulate(map(len, units))), []  # depth counts characters
    for i, (d, _) in enumerate(needles):
        pos = bisect_left(ends, d * ends[-1]) + 1 if k else 0
        while 0 < pos < k and not _BREAK.search(units[pos - 1]):
            pos += 1
        places.append((pos, i))
    out, prev = [], 0
    for pos, i in sorted(places):
        out += units[prev:pos] + [needles[i][1] + sep]
        prev = pos
    return "".join(out + units[prev:]).strip()


def _niah(kind: str, rng: random.Random, depth: float, length: int):
    """(needles, question, answers) of a needle-in-a-haystack task."""
    if kind == "niah_single":
        key = str(rng.randint(1_000_000, 9_999_999))
        needles = [(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")]
        return needles, "What is the pass key? Answer with only the value.\nThe pass key is", (key,)
    if kind == "niah_multikey":
        keys = rng.sample(_words(), NEEDLES if length >= 1024 else 2)  # UUIDs take room: ~50 tokens a needle
        values = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in keys]
        depths = [depth] + [rng.uniform(0.1, 0.9) for _ in keys[1:]]
        needles = [(d, f"One of the special magic UUIDs for {k} is: {v}.") for d, k, v in zip(depths, keys, values)]
        what = f"special magic UUID for {keys[0]} mentioned in the provided text"
        return needles, f"What is the {what}? Answer with only the value.\nThe {what} is", (values[0],)
    key = rng.choice(_words())
    values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), NEEDLES)]
    depths = [depth] + [rng.uniform(0.1, 0.9) for _ in values[1:]]
    needles = [(d, f"One of the special magic numbers for {key} is: {v}.") for d, v in zip(depths, values)]
    what = f"special magic numbers for {key} mentioned in the provided text"
    return needles, f"What are all the {what}? Answer with only the values.\nThe {what} are", tuple(values)


def _vt(rng: random.Random, depth: float):
    """(needles, question, answers) of variable tracking: the chain's statements in order, the first
    at `depth` and the rest spread after it."""
    names: list[str] = []
    while len(names) < HOPS + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        names += [name] if name not in names else []
    value = str(rng.randint(10_000, 99_999))
    depths = [depth] + sorted(rng.uniform(depth, 0.95) for _ in names[1:])
    sources = [value] + [f"VAR {n}" for n in names[:-1]]
    needles = [(d, f"VAR {n} = {s}.") for d, n, s in zip(depths, names, sources)]
    question = (
        f"Question: Find all variables that are assigned the value {value} in the text above. Answer with only "
        f"the variable names.\nAnswer: According to the chain of variables assigned in the text above, "
        f"{len(names)} variables are assigned the value {value}, they are:"
    )
    return needles, question, tuple(names)


def _cwe(rng: random.Random):
    """(build(n) -> the user message with a list of n entries (at least 20), answers) of common-word
    extraction. The common words appear up to 30 times (RULER's frequency), at least twice as often as any
    rare one; the rare ones once each in short lists, up to 3 times in long ones (more once the word pool
    runs out)."""
    pool = rng.sample(_words(), len(_words()))
    common, rare = pool[:COMMON], pool[COMMON:]
    seed = rng.random()

    def build(n: int) -> str:
        times = max(2, min(30, n // 12))
        while True:
            m = max(0, n - COMMON * times)  # rare entries
            kinds = min(len(rare), max(1, math.ceil(m / min(3, 1 + m // 100))))
            if times >= 2 * math.ceil(m / kinds):
                break
            times += 1
        words = common * times + [rare[i % kinds] for i in range(m)]
        random.Random(f"{seed}/{n}").shuffle(words)
        listing = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(words))
        return (
            "Below is a numbered list of words. In these words, some appear more often than others. Memorize "
            f"the ones that appear most often.\n\n{listing}\n\nQuestion: What are the {COMMON} most common words "
            f"in the above list? Answer with only the words.\nAnswer: The top {COMMON} words that appear most "
            "often in the list are:"
        )

    return build, tuple(common)


def _fit(tokenizer, length: int, build) -> list[int]:
    """The chat-template ids of build(k) for the largest k (haystack words, list entries) whose prompt has at
    most `length` tokens (or one within 1% below it): Newton steps on the token count, which is near linear in
    k, kept inside the bracket found so far (bisection where a step leaves it)."""

    def ids(k: int) -> list[int]:
        return tokenizer.prompt_ids([{"role": "user", "content": build(k)}])

    best = ids(0)
    base = len(best)
    if base > (1 - TOLERANCE) * length:
        raise SkipjackError(f"a context length of {length} tokens is too short: the question alone takes {base}")
    lo, hi, k = 0, None, 64  # len(ids(lo)) <= length < len(ids(hi))
    for _ in range(64):
        got = ids(k)
        if len(got) <= length:
            lo, best = k, got
            if length - len(got) <= 0.01 * length:
                break
        else:
            hi = k
        if hi is not None and hi - lo <= 1:
            break
        step = round((length - len(got)) * k / max(len(got) - base, 1))  # tokens to go / tokens per unit
        k = k + step if lo < k + step < (hi or math.inf) else (lo + hi) // 2 if hi else lo + 1
    if len(best) < (1 - TOLERANCE) * length:
        raise SkipjackError(f"cannot fit a prompt to {length} tokens (got {len(best)})")
    return best


def make_tasks(tokenizer, length: int, seed: int = 0, n: int = 1, kinds=KINDS, haystacks=HAYSTACKS) -> list[LongTask]:
    """`n` tasks of each kind and haystack (cwe: one haystack, "n/a") at `length` tokens; task i of a group has
    seed `seed + i` and its needle in the i-th of n equal slices of depths 10%..90%."""
    if isinstance(length, bool) or not isinstance(length, int) or length < MIN_LENGTH:
        raise SkipjackError(f"the context length must be an integer of at least {MIN_LENGTH} tokens (got {length!r})")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SkipjackError(f"the number of tasks per kind must be a positive integer (got {n!r})")
    kinds, haystacks = tuple(kinds), tuple(haystacks)
    for name, got, known in (("kind", kinds, KINDS), ("haystack", haystacks, HAYSTACKS)):
        bad = [x for x in got if x not in known] or ([] if got else ["(none)"])
        if bad:
            raise SkipjackError(f"unknown long-context task {name} {bad[0]!r}; known: {', '.join(known)}")
    out = []
    for kind in kinds:
        for hay in haystacks if kind != "cwe" else ("n/a",):
            for i in range(n):
                rng = random.Random(f"skipjack.longctx/{kind}/{hay}/{seed + i}")
                depth = 0.0 if kind == "cwe" else round(0.1 + 0.8 * (i + rng.random()) / n, 4)
                if kind == "cwe":
                    build, answers = _cwe(rng)
                else:
                    needles, question, answers = _vt(rng, depth) if kind == "vt" else _niah(kind, rng, depth, length)

                    def build(k, needles=needles, question=question, kind=kind, hay=hay):
                        return f"{INTRO[kind]}\n\n{_haystack(hay, k, needles)}\n\n{question}"

                prompt = _fit(tokenizer, length, build)
                max_new = len(tokenizer.encode(", ".join(answers), add_special_tokens=False)) + 16
                out.append(LongTask(kind, hay, length, seed + i, prompt, answers, max_new, depth))
    return out


def score(task: LongTask, output: str) -> float:
    """RULER's string_match_all: the fraction of the task's answers found in `output`, case-insensitive."""
    text = output.lower()
    return sum(a.lower() in text for a in task.answers) / len(task.answers)


def evaluate(tasks, generate) -> list[dict]:
    """One row per task; `generate(prompt_ids, max_new) -> str` is the model under test (greedy, usually)."""
    rows = []
    for t in tasks:
        output = generate(list(t.prompt), t.max_new)
        row = {"kind": t.kind, "haystack": t.haystack, "length": t.length, "seed": t.seed, "depth": t.depth}
        rows.append(row | {"prompt_tokens": len(t.prompt), "score": score(t, output), "output": output[:200]})
    return rows


def summarize(rows) -> dict:
    """{kind: mean score, ..., "overall": the mean of the kinds' means} (each kind weighs the same, as RULER
    averages its tasks)."""
    if not rows:
        raise SkipjackError("no long-context results to summarize")
    by_kind: dict[str, list[float]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r["score"])
    out = {k: sum(v) / len(v) for k, v in by_kind.items()}
    return out | {"overall": sum(out.values()) / len(out)}
