"""RULER-style long-context tasks: prompts fitted to the length, needles where they should be, scoring."""

from __future__ import annotations

import re
from collections import Counter

import pytest
from conftest import byte_bpe_tokenizer

from skipjack.errors import SkipjackError
from skipjack.evaluation import longctx
from skipjack.loading.tokenizer import Tokenizer

LENGTHS = (1024, 2048)
NEEDLE = re.compile(
    r"One of the special magic \w+ for \w+ is: [\w-]+\.|The pass key is \d+\. Remember it\. \d+ is the pass key\."
    r"|VAR [A-Z]{5} = (?:VAR [A-Z]{5}|\d+)\."
)
GROUPS = {(k, h) for k in longctx.KINDS if k != "cwe" for h in longctx.HAYSTACKS} | {("cwe", "n/a")}


@pytest.fixture(scope="module")
def tok():
    """The tiny byte-level BPE tokenizer (about one token per character) with its chat template."""
    hf = byte_bpe_tokenizer()
    return Tokenizer(hf, hf.chat_template, None)


@pytest.fixture(scope="module")
def tasks(tok):
    """Two tasks of every kind and haystack at each length."""
    return {n: longctx.make_tasks(tok, n, seed=0, n=2) for n in LENGTHS}


def oracle(task):
    return ", ".join(task.answers)


def user_text(tok, task) -> str:
    text = tok.decode(task.prompt)
    assert text.startswith("user: ") and text.endswith("assistant:")  # the chat template was applied
    return text


@pytest.mark.parametrize("length", LENGTHS)
def test_every_kind_and_haystack_fits_the_length(tasks, length):
    got = tasks[length]
    assert {(t.kind, t.haystack) for t in got} == GROUPS and len(got) == 2 * len(GROUPS)
    for t in got:
        assert 0.95 * length <= len(t.prompt) <= length, (t.kind, t.haystack, len(t.prompt))
        assert t.length == length and t.seed in (0, 1)


@pytest.mark.parametrize("length", LENGTHS)
def test_needles_are_in_the_prompt_once_and_at_their_depth(tok, tasks, length):
    """At their depth in characters of haystack, give or take a line (a needle goes after a sentence or line)."""
    for t in tasks[length]:
        if t.kind == "cwe":
            continue
        text = user_text(tok, t)
        for a in t.answers:  # the pass key is said twice; a variable where it is set and where it is read
            twice = t.kind == "niah_single" or (t.kind == "vt" and a != t.answers[-1])
            assert text.count(a) == 1 + twice, (t.kind, a)
        assert t.max_new > len(tok.encode(oracle(t), add_special_tokens=False))
        body = text[text.index("\n\n") : text.rindex("\n\n")]  # the haystack, between the intro and the question
        body = NEEDLE.sub(lambda m, a=t.answers[0]: "\0" if a in m[0] else "", body)  # the asked one marked
        where = body.index("\0") / len(body)
        assert 0.1 <= t.depth <= 0.9 and abs(where - t.depth) * len(body) < 100, (t.kind, t.haystack, t.depth, where)


def test_vt_chain_is_in_order(tok, tasks):
    for t in tasks[2048]:
        if t.kind != "vt":
            continue
        text = user_text(tok, t)
        value = re.search(r"assigned the value (\d+)", text).group(1)
        sources = [value] + [f"VAR {n}" for n in t.answers[:-1]]
        places = [text.index(f"VAR {n} = {s}.") for n, s in zip(t.answers, sources)]
        assert places == sorted(places) and len(t.answers) == longctx.HOPS + 1
        assert len(re.findall(r"VAR [A-Z]{5} = ", text)) == len(t.answers)


def test_multikey_has_distractors_and_asks_one_key(tok, tasks):
    for t in tasks[1024]:
        if t.kind != "niah_multikey":
            continue
        text = user_text(tok, t)
        keys = re.findall(r"One of the special magic UUIDs for (\w+) is: ", text)
        asked = re.search(r"What is the special magic UUID for (\w+) ", text).group(1)
        assert len(set(keys)) == len(keys) == longctx.NEEDLES and asked in keys
        assert f"for {asked} is: {t.answers[0]}." in text


@pytest.mark.parametrize("length", LENGTHS)
def test_cwe_answers_are_the_ten_most_common_words(tok, tasks, length):
    for t in tasks[length]:
        if t.kind != "cwe":
            continue
        entries = re.findall(r"^(\d+)\. ([a-z]+)$", user_text(tok, t), flags=re.M)
        assert [int(i) for i, _ in entries] == list(range(1, len(entries) + 1))
        counts = Counter(w for _, w in entries)
        assert set(t.answers) == {w for w, _ in counts.most_common(longctx.COMMON)}
        rest = [c for w, c in counts.items() if w not in t.answers]
        assert rest and min(counts[a] for a in t.answers) >= 2 * max(rest)


def test_same_input_gives_the_same_ids(tok, tasks):
    again = longctx.make_tasks(tok, 1024, seed=0, n=2)
    assert again == tasks[1024]
    assert all(isinstance(i, int) for t in again for i in t.prompt)


def test_different_seeds_give_different_needles(tok, tasks):
    other = longctx.make_tasks(tok, 1024, seed=7, n=2)
    for a, b in zip(tasks[1024], other):
        assert (a.kind, a.haystack) == (b.kind, b.haystack)
        assert a.answers != b.answers and a.prompt != b.prompt
    assert other[0].seed == 7 and other[1].seed == 8


def test_depths_spread_over_the_tasks(tok):
    got = longctx.make_tasks(tok, 1024, seed=3, n=4, kinds=("niah_single",), haystacks=("repeat",))
    depths = [t.depth for t in got]
    assert [int((d - 0.1) / 0.2) for d in depths] == [0, 1, 2, 3]  # one in each fifth of 10%..90%
    assert len({t.answers for t in got}) == 4


def test_score_is_the_share_of_answers_found(tasks):
    multi = next(t for t in tasks[1024] if t.kind == "niah_multivalue")
    vt = next(t for t in tasks[1024] if t.kind == "vt")
    for t in tasks[1024]:
        assert longctx.score(t, oracle(t)) == 1.0
        assert longctx.score(t, "") == 0.0
    assert longctx.score(multi, f"{multi.answers[0]} and {multi.answers[2]}") == 0.5
    assert longctx.score(multi, f"The numbers are {multi.answers[3]}.") == 0.25
    assert longctx.score(vt, oracle(vt).lower()) == 1.0  # case-insensitive


def test_evaluate_with_an_oracle_scores_one(tasks):
    by_prompt = {tuple(t.prompt): t for t in tasks[1024]}
    calls = []

    def generate(ids, max_new):
        t = by_prompt[tuple(ids)]
        calls.append(max_new == t.max_new)
        return " " + oracle(t) + " " * 300

    rows = longctx.evaluate(tasks[1024], generate)
    assert len(rows) == len(tasks[1024]) and all(calls) and len(calls) == len(rows)
    assert all(r["score"] == 1.0 and len(r["output"]) == 200 for r in rows)
    assert {(r["kind"], r["haystack"]) for r in rows} == GROUPS
    assert longctx.summarize(rows) == {k: 1.0 for k in longctx.KINDS} | {"overall": 1.0}


def test_summarize_averages_per_kind_then_over_kinds():
    rows = [{"kind": "vt", "score": 1.0}, {"kind": "vt", "score": 0.0}, {"kind": "cwe", "score": 0.2}]
    got = longctx.summarize(rows)
    assert got["vt"] == 0.5 and got["cwe"] == 0.2 and got["overall"] == pytest.approx(0.35)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"length": 100}, "at least 256"),
        ({"length": 1024.0}, "at least 256"),
        ({"n": 0}, "positive integer"),
        ({"kinds": ("niah_single", "bogus")}, "kind 'bogus'"),
        ({"haystacks": ("essay",)}, "haystack 'essay'"),
        ({"haystacks": ()}, "haystack '(none)'"),
        ({"length": 300, "kinds": ("cwe",)}, "too short"),  # the tiny tokenizer spends ~1 token a character
    ],
)
def test_bad_input_is_a_one_line_error(tok, kw, message):
    kw = {"length": 1024} | kw
    with pytest.raises(SkipjackError, match=re.escape(message)) as e:
        longctx.make_tasks(tok, **kw)
    assert "\n" not in str(e.value)


def test_summarize_of_nothing_is_an_error():
    with pytest.raises(SkipjackError, match="no long-context results"):
        longctx.summarize([])


@pytest.mark.real
def test_fits_with_the_real_tokenizer():
    """SmolLM2's tokenizer (digits one token each, system prompt in its template) at 256 and 8192 tokens."""
    from transformers import AutoTokenizer

    from skipjack.loading.load import DEFAULT_MODEL, read_meta, source_folder

    folder, _ = source_folder(DEFAULT_MODEL)
    hf = AutoTokenizer.from_pretrained(str(folder))
    tok = Tokenizer(hf, read_meta(folder).get("chat_template") or hf.chat_template, None)
    for length in (256, 8192):
        got = longctx.make_tasks(tok, length, seed=1)
        assert {(t.kind, t.haystack) for t in got} == GROUPS
        for t in got:
            assert 0.95 * length <= len(t.prompt) <= length, (t.kind, t.haystack, len(t.prompt))
            text = tok.decode(t.prompt)
            assert all(a in text for a in t.answers) and text.endswith("<|im_start|>assistant\n")
