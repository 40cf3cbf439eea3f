"""Local text for training drafts, with no download: chat prompts built from the Python stdlib, the model's own
answers to them, and raw stdlib source.

The prompts and the source are `skipjack.texts`' (`corpus_prompts`, `source_text`): stdlib modules that neither
the benchmark prompts nor the eval harness use (the bench draws on pydoc topics, licenses and HumanEval): write a
function from its signature and docstring, explain a function's source, summarise a module's documentation, say
when to use a function. They are listed in a fixed order and shuffled by a seed, so a corpus is reproducible.

`answers` has the model answer them greedily (through the engine, with prompt lookup: the same tokens as plain
decoding, sooner); distilling on those answers trains a draft on the text it will be asked to predict, which is
the model's own (Kangaroo, Medusa-2 and EAGLE regenerate their training answers with the target model for the
same reason).
"""

from __future__ import annotations

from collections.abc import Callable

from skipjack.texts import corpus_prompts as prompts  # noqa: F401 (the corpus's prompts: `skipjack.texts`)
from skipjack.texts import source_text  # noqa: F401 (raw stdlib source: `skipjack.texts`)


def answers(engine, texts: list[str], max_new: int, keep: Callable[[list[int]], None] | None = None) -> list[list[int]]:
    """Each prompt through the chat template followed by the model's greedy answer (token ids), each also handed
    to `keep` as it comes; a prompt too long for the model's context gets [] (no answer)."""
    from skipjack.decoding.sampling import SamplingParams
    from skipjack.engine import Request

    tok, room = engine.tokenizer, engine.model.config.max_position_embeddings - max_new
    params = SamplingParams(max_new_tokens=max_new, stop_token_ids=tok.stop_ids)
    out = []
    for text in texts:
        ids = tok.prompt_ids(text)
        out.append(ids + engine.complete(Request(ids, params, "pld")).tokens if len(ids) <= room else [])
        if keep is not None:
            keep(out[-1])
    return out
