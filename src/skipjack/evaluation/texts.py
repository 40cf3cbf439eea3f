"""The harness's windows of local text. The text is `skipjack.texts.eval_documents`: pydoc topics the benchmark
prompts do not draw on (the long ones; the drafters take the short ones), and the sources of stdlib modules that
neither the drafters' text (`skipjack.texts.local_text`, the corpus) nor the prompts use. Windows are cut at
fixed places (every document in a fixed order, prose and code alternating), so a run is reproducible on one
Python version (the text ships with it)."""

from __future__ import annotations

from skipjack.prompts import pydoc_topics_used as bench_topics  # noqa: F401 (re-exported: what the prompts use)
from skipjack.texts import EVAL_SOURCES as SOURCES  # noqa: F401 (re-exported)
from skipjack.texts import eval_documents as documents


def windows(tokenizer, n: int, prompt: int, cont: int) -> list[tuple[list[int], list[int]]]:
    """`n` windows of (prompt ids [prompt], continuation ids [cont]), prose and code taking turns; within a
    kind, the documents take turns too (each gives its windows from its start, one after another)."""
    size, kinds = prompt + cont, []
    for docs in documents():
        per_doc = []
        for d in docs:
            ids = tokenizer.encode(d, add_special_tokens=False)
            per_doc.append([ids[i : i + size] for i in range(0, len(ids) - size + 1, size)])
        depth = max((len(x) for x in per_doc), default=0)
        kinds.append([w[d] for d in range(depth) for w in per_doc if d < len(w)])
    out = [w for pair in zip(*kinds) for w in pair]
    out += [w for k in kinds for w in k[len(out) // 2 :]]  # the longer kind's rest
    return [(w[:prompt], w[prompt:]) for w in out[:n]]
