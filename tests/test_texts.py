"""Local text and prompt suites (`skipjack.texts`, `skipjack.prompts`): one place each, and what the drafters
learn from shares no passage with a benchmark prompt or the eval harness's text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from skipjack import corpus, prompts, texts, vocab
from skipjack.evaluation import texts as eval_texts

SRC = Path(__file__).resolve().parents[1] / "src" / "skipjack"


def _prompt_text() -> str:
    return "\n".join(m["content"] for p in prompts.every_shipped_prompt() for m in p.messages)


def _eval_text() -> str:
    prose, code = texts.eval_documents()
    return "\n".join(prose + code)


DRAFTERS_TEXTS = {  # every local text a drafter learns from or searches on, by its user
    "local_text (vocab token counts, lwq calibration, layer probes)": lambda: texts.local_text(),
    "draft_text (skip-set searches)": lambda: texts.draft_text(),
    "corpus prompts (distillation)": lambda: "\n".join(corpus.prompts(100_000)),
    "corpus source (distillation)": lambda: corpus.source_text(10_000_000),
}


@pytest.fixture(scope="module")
def held():
    return {"benchmark prompts": texts.passages(_prompt_text()), "eval harness": texts.passages(_eval_text())}


@pytest.mark.parametrize("name", list(DRAFTERS_TEXTS))
def test_drafters_text_shares_no_passage_with_prompts_or_eval(held, name):
    text = DRAFTERS_TEXTS[name]()
    assert len(text) > 10_000
    mine = texts.passages(text)
    for other, theirs in held.items():
        shared = len(mine & theirs)
        assert not shared, f"{name} shares {shared} passages of {texts.SHARED_WORDS} words with the {other}"


def test_eval_text_shares_no_passage_with_the_prompts(held):
    assert not held["benchmark prompts"] & held["eval harness"]
    prose, code = texts.eval_documents()
    assert len(prose) >= 10 and len(code) >= 8


def test_nested_pydoc_topics_are_told_apart_by_content():
    """`compound` holds `with` (a benchmark prompt's source): neither is the harness's or the drafters'."""
    from pydoc_data.topics import topics

    mine = set(texts.drafter_topics()) | set(texts.eval_documents()[0])
    assert "with" in prompts.pydoc_topics_used() and "compound" not in prompts.pydoc_topics_used()
    assert not {topics["with"], topics["compound"], topics["specialnames"]} & mine


def test_the_users_read_these_texts():
    """The token counts, the corpus and the harness take their text from `skipjack.texts`, not copies of it."""
    assert vocab.local_text is texts.local_text
    assert corpus.prompts is texts.corpus_prompts and corpus.source_text is texts.source_text
    assert eval_texts.documents is texts.eval_documents
    assert corpus.prompts(40, seed=0) == corpus.prompts(40, seed=0) != corpus.prompts(40, seed=1)
    assert "def " in texts.draft_text()[:4000] and texts.draft_text() == texts.draft_text()


# Readers of the stdlib's text or of the shipped prompt files other than these two modules; each one named here
# is for the lead to move (see the report of issue #35), and the list may only shrink.
ELSEWHERE = {"evaluation/selfcheck.py", "evaluation/longctx.py"}


def test_local_text_and_prompt_files_are_read_in_one_place():
    pattern = re.compile(r"pydoc_data|sysconfig\.get_paths|joinpath\(\"prompts\"")
    found = {
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if pattern.search(p.read_text()) and p.name not in ("texts.py", "prompts.py")
    }
    assert found <= ELSEWHERE, f"local text or prompt files read outside texts.py / prompts.py: {found - ELSEWHERE}"


def test_suites_parse_and_bad_lines_are_one_line():
    from skipjack.errors import SkipjackError

    assert len(prompts.load_suite("quick")) == 6 and len(prompts.load_suite("sample")) == 18
    for text, needle in [
        ('{"id": "a", "messages": [', "not valid JSON"),
        ("[1]", "expected a JSON object"),
        ('{"messages": []}', '"messages" must be a non-empty list'),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "each message needs a role"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}', "last message must be from the user"),
        ('{"messages": [{"role": "user", "content": " "}]}', "the prompt is empty"),
        ('{"id": "", "messages": [{"role": "user", "content": "x"}]}', '"id" and "category"'),
    ]:
        with pytest.raises(SkipjackError) as e:
            prompts.parse_prompts(text, "f.jsonl")
        assert needle in str(e.value) and str(e.value).startswith("f.jsonl:1: ") and "\n" not in str(e.value)
