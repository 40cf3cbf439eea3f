"""Prefix-aware routing: the replica that most likely holds a prompt's prefix in its caches, without Ray.

A prompt's whole blocks of `block` tokens each get a key chained over every block before it (vLLM's block
hashes: key_i = H(key_{i-1}, tokens of block i)), so one key names one whole prefix. `PrefixTable` remembers,
per key, the replicas that were sent a prompt with that prefix (least recently used keys dropped past its
capacity). `rank` orders the replicas for a request:

1. the longest matched prefix first: that replica's prefix cache, n-gram tables and sessions hold it. As in
   SGLang's cache-aware router, a match counts only when it covers at least `RATIO` of the prompt and its
   replica's load is within `SLACK` of the least loaded one: a short head that every request shares (a chat
   template's system prompt) is worth less than balance, and no prefix can draw all requests to one replica;
2. among equal matches (none: a new conversation), the least loaded;
3. then by rendezvous hashing (Thaler & Ravishankar 1998, highest random weight: the replica with the highest
   H(first key, replica)), so ties stay put as replicas come and go: only a departed replica's prompts move;
4. a replica that is full (load >= `full`, its batch's rows) goes last, least loaded first: the request falls
   back to the least-loaded replica with room rather than queue behind a full batch.

Why not the first block alone: a chat template puts the same text first in every conversation of a model
(SmolLM2's default system prompt is about 20 tokens), so the first block is the same for every request and
would send all of them to one replica; the chained keys still separate conversations after their shared head.
The routing is exact for one router; each ingress replica keeps its own table (a second ingress learns its own
traffic).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

BLOCK = 16  # tokens per block: the prefix cache reuses a prefix of at least 16 tokens (`decoding.prefix`)
CAPACITY = 1 << 16  # prefix keys remembered per router
SLACK = 2  # a replica's match counts while it has at most this many more requests than the least loaded
RATIO = 0.5  # ... and while the match covers at least this share of the prompt


def _h(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


def keys(ids: Sequence[int], block: int = BLOCK) -> list[int]:
    """The chained keys of the prompt's whole blocks: key i names tokens [0, (i + 1) x block)."""
    out, prev = [], 0
    for i in range(len(ids) // block):
        prev = _h(prev, tuple(ids[i * block : (i + 1) * block]))
        out.append(prev)
    return out


class PrefixTable:
    """Which replicas were sent which prefixes (bounded: the least recently used keys go first)."""

    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self.held: OrderedDict[int, dict[str, None]] = OrderedDict()  # key -> replicas (insertion-ordered set)

    def match(self, ks: list[int]) -> dict[str, int]:
        """Per replica, how many of the prompt's blocks it was sent (the longest matched key, +1)."""
        found: dict[str, int] = {}
        for i in range(len(ks) - 1, -1, -1):
            for r in self.held.get(ks[i], ()):
                found.setdefault(r, i + 1)
        return found

    def record(self, ks: list[int], replica: str) -> None:
        for k in ks:
            self.held.setdefault(k, {})[replica] = None
            self.held.move_to_end(k)
        while len(self.held) > self.capacity:
            self.held.popitem(last=False)

    def forget(self, replica: str) -> None:
        """A replica gone (died, scaled down): its prefixes route afresh."""
        empty = []
        for k, rs in self.held.items():
            rs.pop(replica, None)
            if not rs:
                empty.append(k)
        for k in empty:
            del self.held[k]


def rank(ks: list[int], matched: dict[str, int], loads: dict[str, int], full: int, blocks: float) -> list[str]:
    """Replica ids (`loads`' keys: requests in flight on each), best first (the module's rules); `blocks`: the
    prompt's length in blocks."""
    first, least = (ks[0] if ks else 0), min(loads.values(), default=0)

    def score(r: str):
        m = matched.get(r, 0)
        counts = m >= RATIO * blocks and loads[r] - least <= SLACK
        return (-m if counts else 0, loads[r], -_h(first, r))

    order = sorted(loads, key=score)
    return [r for r in order if loads[r] < full] + sorted((r for r in order if loads[r] >= full), key=loads.get)
