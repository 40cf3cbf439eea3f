"""What a fleet's replicas share, held by one small deployment (`Board`) that they call through Ray.

- **Metrics.** Each replica publishes its Prometheus text every second (`publish`); the ingress's /metrics
  merges the live ones, each sample labelled with its replica (`server.metrics.merge`). A replica that stopped
  publishing for `STALE` seconds (it died) drops out, as a scraped target would.
- **The n-gram tables**, merged through Ray's object store every `share` seconds: a replica sends its rows, the
  board max-merges them into its table of that name (`NGramTable.merge_row`: the persisted file's rule, so a
  merge repeated or crossed with another changes nothing) and sends back the merged rows, which the replica
  max-merges into its own. Why merged and not per replica: routing already keeps a conversation on one replica,
  so most of what a table learns is drafted where it was learned; the merge is for the rest, a new or replaced
  replica that would start cold, and a conversation moved off a full replica. `share=0` keeps each table to its
  replica.
- **The cost model's prior and the kernels' row choices, measured once per machine kind.** They are cache files
  named by a digest of what they depend on (the model's shapes, the CPU's name, the threads, torch's version:
  `decoding.tuning`), so a file measured on one node is the right one on any node of the same kind and an
  unused name on any other. The first replica of a kind (`claim`) measures while the others wait, then
  publishes its files (`add_files`); every replica writes the published files it lacks into its own cache
  folder before it loads (each file is checked against its schema when read, as any cache file is).

`Board` is a plain class (tested without Ray); `deploy.application` makes it a Serve deployment of one replica.
Serve runs its methods in a thread pool, so each holds the board's lock.
"""

from __future__ import annotations

import functools
import re
import threading
import time

from skipjack import store
from skipjack.drafters.ngram_table import NGramTable

STALE = 10.0  # seconds without a publish after which a replica's metrics are dropped
CLAIM_S = 600.0  # a claim on a machine kind lapses after this long (its holder died while measuring)
FILE = re.compile(r"(rows|costs)/[0-9a-f]{20}\.json")  # the cache files `decoding.tuning` writes

Rows = list[tuple[tuple[int, ...], dict[int, float]]]


def tuning_files() -> dict[str, str]:
    """This node's tuning cache files (`decoding.tuning`), by their name under the home folder."""
    out = {}
    for sub in ("rows", "costs"):
        for p in sorted((store.home() / sub).glob("*.json")):
            if FILE.fullmatch(name := f"{sub}/{p.name}"):
                out[name] = p.read_text()
    return out


def take_files(files: dict[str, str]) -> None:
    """The published tuning files this node lacks, written into its cache folder (checked when read)."""
    for name, text in files.items():
        path = store.home() / name
        if FILE.fullmatch(name) and not path.exists():
            store.write_atomic(path, text)


def _locked(method):
    @functools.wraps(method)
    def held(self, *args, **kw):
        with self.lock:
            return method(self, *args, **kw)

    return held


class Board:
    def __init__(self, clock=time.monotonic):
        self.clock, self.lock = clock, threading.Lock()
        self.snapshots: dict[str, tuple[float, str]] = {}  # replica -> (time, its metrics text)
        self.tables: dict[str, NGramTable] = {}
        self.files: dict[str, str] = {}  # "costs/<digest>.json" -> its text
        self.claims: dict[str, tuple[str, float]] = {}  # machine kind -> (the replica measuring, since)
        self.measured: set[str] = set()  # machine kinds whose files are published

    @_locked
    def publish(self, replica: str, text: str) -> None:
        self.snapshots[replica] = (self.clock(), text)

    @_locked
    def leave(self, replica: str) -> None:
        self.snapshots.pop(replica, None)

    @_locked
    def metrics(self) -> dict[str, str]:
        """The live replicas' metrics texts (those published within `STALE` seconds)."""
        now = self.clock()
        self.snapshots = {r: s for r, s in self.snapshots.items() if now - s[0] <= STALE}
        return {r: text for r, (_, text) in sorted(self.snapshots.items())}

    @_locked
    def merge(self, name: str, order: int, rows: Rows) -> Rows:
        """Max-merge a replica's rows of table `name` into the board's; the merged rows back."""
        table = self.tables.setdefault(name, NGramTable(order=order))
        for key, kids in rows:
            table.merge_row(tuple(key), kids)
        return [(k, dict(v)) for k, v in table.next.items()]

    @_locked
    def sizes(self) -> dict[str, int]:
        """Each shared n-gram table's contexts."""
        return {name: len(t.next) for name, t in self.tables.items()}

    @_locked
    def claim(self, kind: str, replica: str) -> bool:
        """True when `replica` may load now: the kind is measured already, or it is the one to measure it (no
        live claim by another)."""
        held = self.claims.get(kind)
        if kind in self.measured or held is None or held[0] == replica or self.clock() - held[1] > CLAIM_S:
            self.claims[kind] = (replica, self.clock())
            return True
        return False

    @_locked
    def release(self, kind: str, measured: bool) -> None:
        self.claims.pop(kind, None)
        if measured:
            self.measured.add(kind)

    @_locked
    def add_files(self, files: dict[str, str]) -> None:
        self.files |= {k: v for k, v in files.items() if FILE.fullmatch(k) and isinstance(v, str)}

    @_locked
    def get_files(self) -> dict[str, str]:
        return dict(self.files)
