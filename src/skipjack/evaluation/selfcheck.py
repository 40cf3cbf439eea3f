"""A small self-checking task for a model too small for HumanEval (SmolLM2-135M's pass@1 is near zero, so it
could not tell a damaged model from a whole one): questions whose answer a 135M chat model mostly gets right
and a script can check, asked through the chat template, greedy.

- copy: repeat a sentence from the stdlib's docs exactly (the answer must contain it);
- capitals: the capital of a well-known country (the answer must name it);
- next: the next item of a simple list (days, months, letters, counting): the answer must contain it.

A lossy method's score next to plain decoding's (the same items, the same dtype) says how much of what the
model can do survives; items are fixed (a seed picks the sentences), so runs compare.
"""

from __future__ import annotations

import random
import re

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Germany": "Berlin", "Spain": "Madrid",
    "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "China": "Beijing", "England": "London",
    "Greece": "Athens", "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin", "Norway": "Oslo",
    "Poland": "Warsaw",
}  # fmt: skip
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October November December".split()


def items(n: int | None = None, seed: int = 0) -> list[dict]:
    """[{"id", "prompt", "answer"}]: the task's questions, in a fixed order (`n`: the first n)."""
    from pydoc_data.topics import topics

    rng = random.Random(seed)
    kinds: list[list[dict]] = [[], [], []]
    sentences = [
        s.strip()
        for t in sorted(topics)
        for s in re.split(r"(?<=\.)\s+", topics[t])
        if 40 <= len(s.strip()) <= 90 and "\n" not in s.strip() and s.strip()[0].isupper()
    ]
    for i, s in enumerate(rng.sample(sentences, 16)):
        kinds[0].append(
            {"id": f"copy-{i}", "prompt": f"Repeat this sentence exactly, and nothing else:\n{s}", "answer": s}
        )
    for country, city in CAPITALS.items():
        kinds[1].append({"id": f"capital-{country}", "prompt": f"What is the capital of {country}?", "answer": city})
    seqs = [DAYS[i : i + 4] for i in range(3)] + [MONTHS[i : i + 4] for i in range(0, 8, 2)]
    seqs += [[chr(65 + i + j) for j in range(4)] for i in range(0, 12, 3)]
    seqs += [[str(a + d * j) for j in range(4)] for a, d in ((1, 1), (2, 2), (5, 5), (10, 10))]
    for i, s in enumerate(seqs):
        prompt = "What comes next in this list? Answer with the next item only.\n" + ", ".join(s[:3]) + ","
        kinds[2].append({"id": f"next-{i}", "prompt": prompt, "answer": s[3]})
    out = [k[i] for i in range(max(map(len, kinds))) for k in kinds if i < len(k)]  # the kinds take turns
    return out[:n] if n else out


def check(item: dict, text: str) -> bool:
    """Whether the model's answer holds the expected one (whitespace and case aside for short answers)."""
    norm = lambda x: " ".join(x.split())  # noqa: E731
    if item["id"].startswith("copy"):
        return norm(item["answer"]) in norm(text)
    return re.search(rf"\b{re.escape(item['answer'].lower())}\b", text.lower()) is not None
