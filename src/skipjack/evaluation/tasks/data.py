"""The bundled lm-eval tasks' documents, made here (no hub, no download): `custom_dataset` in their YAML files.

- `capitals` (`skipjack_capitals`: multiple choice; `skipjack_capitals_gen`: generation): 30 countries; each
  document asks for one capital among four (the right one and three other capitals from the list, chosen and
  ordered by the document's index, so the gold position cycles 0-3).
- `arith` (`skipjack_arith`: generation): 40 sums of two numbers in 2-60 (a fixed linear congruential
  sequence), answered as digits.
"""

from __future__ import annotations

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Canada", "Ottawa"),
    ("Australia", "Canberra"), ("Argentina", "Buenos Aires"), ("Mexico", "Mexico City"), ("India", "New Delhi"),
    ("Kenya", "Nairobi"), ("Greece", "Athens"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Ireland", "Dublin"),
    ("Turkey", "Ankara"), ("Thailand", "Bangkok"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Cuba", "Havana"),
    ("Hungary", "Budapest"), ("Netherlands", "Amsterdam"), ("Denmark", "Copenhagen"),
]  # fmt: skip


def capitals_docs() -> list[dict]:
    n, out = len(CAPITALS), []
    for i, (country, capital) in enumerate(CAPITALS):
        others = [CAPITALS[(i + k) % n][1] for k in (7, 13, 19)]
        gold = i % 4
        choices = others[:gold] + [capital] + others[gold:]
        out.append({"country": country, "choices": choices, "answer": gold})
    return out


def arith_docs() -> list[dict]:
    x, out = 12345, []
    for _ in range(40):
        x = (1103515245 * x + 12345) % 2**31
        a, b = 2 + x % 59, 2 + (x >> 8) % 59
        out.append({"a": a, "b": b, "answer": str(a + b)})
    return out


def _dataset(rows: list[dict]):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def capitals(**_) -> object:
    return _dataset(capitals_docs())


def arith(**_) -> object:
    return _dataset(arith_docs())
