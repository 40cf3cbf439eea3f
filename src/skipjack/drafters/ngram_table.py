"""The n-gram table behind `ngram`: counts of the next token after short contexts, capped in memory, shared by
every request of one engine, and persisted to a JSON file that concurrent processes merge into safely.

Persistence (`ngram:path=FILE`): `save` merges this table into FILE's under an exclusive lock on FILE.lock
(max of each count), writes a temporary file and renames it over FILE, so concurrent writers never lose each
other's rows and readers never see a partial file.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

from skipjack import schemas, store
from skipjack.errors import SkipjackError, Unavailable


class NGramTable:
    def __init__(self, max_contexts: int = 200_000, max_children: int = 8, order: int = 3):
        self.max_contexts, self.max_children, self.order = max_contexts, max_children, order
        self.next: OrderedDict[tuple[int, ...], dict[int, float]] = OrderedDict()

    def add(self, tokens: list[int], start: int, weight: float) -> None:
        """Count the transitions that end at positions >= start, after contexts of 1 .. order-1 tokens."""
        for j in range(max(start, 1), len(tokens)):
            self.count(tokens, j, tokens[j], weight)

    def count(self, tokens: list[int], j: int, nxt: int, weight: float) -> None:
        """Count `nxt` after the contexts of 1 .. order-1 tokens that end just before position j (a weight of 0
        counts nothing: every context's counts stay above zero, so its next-token distribution is defined)."""
        if not weight > 0:
            return
        for n in range(1, min(self.order - 1, j) + 1):
            key = tuple(tokens[j - n : j])
            kids = self.next.get(key)
            if kids is None:
                kids = self.next[key] = {}
                if len(self.next) > self.max_contexts:
                    self.next.popitem(last=False)
            else:
                self.next.move_to_end(key)
            kids[nxt] = kids.get(nxt, 0.0) + weight
            if len(kids) > self.max_children:
                del kids[min(kids, key=kids.get)]

    def lookup(self, *context: int) -> dict[int, float] | None:
        """Next-token counts after the longest known suffix of `context` (back-off to shorter ones)."""
        for n in range(min(len(context), self.order - 1), 0, -1):
            if kids := self.next.get(tuple(context[-n:])):
                return kids
        return None

    def merge_row(self, key: tuple[int, ...], kids: dict[int, float]) -> None:
        """Max-merge one context's counts (a persisted row), within the table's caps and order."""
        if not 1 <= len(key) < self.order:
            return
        mine = self.next.setdefault(key, {})
        self.next.move_to_end(key)
        for t, c in kids.items():
            mine[t] = max(mine.get(t, 0.0), c)
        while len(mine) > self.max_children:
            del mine[min(mine, key=mine.get)]
        while len(self.next) > self.max_contexts:
            self.next.popitem(last=False)

    def save(self, path: Path) -> None:
        """Merge into `path` under an exclusive lock (bounded wait: `store.locked`) and replace it atomically
        (safe for concurrent writers; a failed write leaves the old file and no temporary one)."""
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise Unavailable(f"ngram: cannot create the folder of {path}: {store.reason(e)}") from None
        with store.locked(Path(str(path) + ".lock"), "ngram: saving the table"):
            merged = NGramTable(self.max_contexts, self.max_children, self.order)
            merged.load(path)
            for key, kids in self.next.items():
                merged.merge_row(key, kids)
            rows = [[list(k), {str(t): c for t, c in v.items()}] for k, v in merged.next.items()]
            try:
                with store.atomic_file(path) as tmp:
                    tmp.write_text(json.dumps({"format": 1, "rows": rows}))
            except OSError as e:
                raise Unavailable(f"ngram: cannot save the table to {path}: {store.reason(e)}") from None

    def load(self, path: Path) -> None:
        """Merge the table saved in `path` (if any). Every row is checked first (`schemas.NGramTableFile`: token
        ids, finite counts and at least one above zero, the context length), so a hand-edited or damaged file is
        refused whole, with its first bad row named."""
        path = Path(path)
        if not path.exists():
            return
        try:
            table = schemas.read_json("the n-gram table", path, schemas.NGramTableFile)
        except schemas.SchemaError as e:
            raise SkipjackError(
                f"ngram: the table {path} is damaged ({e.problem}); delete it to start a new one"
            ) from None
        for key, kids in table.rows:
            self.merge_row(key, kids)
