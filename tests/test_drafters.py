"""Drafter behaviour: prompt lookup's matching rule, the n-gram table's cap, persistence and tree shape."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest

from skipjack.decoding.proposal import DraftContext, Proposal, Verdict, judge, merge
from skipjack.drafters.base import Resources
from skipjack.drafters.ngram import NGramDrafter
from skipjack.drafters.ngram_table import NGramTable
from skipjack.drafters.pld import PromptLookup
from skipjack.errors import SkipjackError
from skipjack.methods import MethodSpec, build


def start(drafter, prompt, tables=None):
    """Prepare `drafter` (with its own n-gram tables unless given) and begin a request on `prompt`."""
    drafter.prepare(Resources(tables={} if tables is None else tables))
    s = drafter.session()
    s.begin(prompt)
    return s


def test_pld_prefers_longest_then_most_recent_match():
    ctx = [1, 2, 3, 9, 9, 2, 3, 7, 7, 5, 2, 3]
    s = start(PromptLookup(max_ngram=3, branches=1), ctx)
    # suffix (2, 3) occurs at 1-2 and 5-6; (5, 2, 3) never earlier -> 2-gram, most recent: followed by 7, 7
    assert s.propose(DraftContext(ctx, 3)).tokens == [7, 7, 5]
    ctx2 = ctx + [4, 1, 2, 3]  # now (1, 2, 3) matches the prompt start: the 3-gram wins over the newer 2-gram
    assert s.propose(DraftContext(ctx2, 2)).tokens == [9, 9]


def test_pld_index_is_incremental_and_never_matches_itself():
    ctx = [5, 6, 7]
    s = start(PromptLookup(branches=1), ctx)
    assert s.propose(DraftContext(ctx, 4)) is None  # the suffix occurs only as itself
    ctx += [5, 6]
    assert s.propose(DraftContext(ctx, 4)).tokens == [7, 5, 6]
    assert s.indexed == len(ctx) - 1


def test_pld_scores_follow_observed_acceptance():
    s = start(PromptLookup(), [1, 2, 1, 2, 1, 2])
    prop = s.propose(DraftContext([1, 2, 1, 2, 1, 2], 4))
    before = prop.scores
    for _ in range(20):  # depth 1 always rejected
        s.observe(prop, Verdict([0], [], []))
    after = s.propose(DraftContext([1, 2, 1, 2, 1, 2], 4)).scores
    assert after[0] < before[0] / 4 and all(b <= a for a, b in zip(after, after[1:]))


def test_pld_calibrates_per_request():
    """Copies that paid off in one request (code, say) and fail in the next (a summary): the second request
    scales its own scores down from what the shared rates say; a third starts from the shared rates again."""
    d = PromptLookup(branches=1)
    ctx = [1, 2, 3, 4] * 4
    s = start(d, ctx)
    for _ in range(10):
        prop = s.propose(DraftContext(ctx, 4))
        s.observe(prop, Verdict(prop.tokens + [0], list(range(len(prop))), []))  # every copied token accepted
    assert s.factor() > 1.0
    s.end()
    s = d.session()
    s.begin(ctx)
    shared = s.propose(DraftContext(ctx, 4)).scores
    assert s.factor() == 1.0
    for _ in range(10):
        prop = s.propose(DraftContext(ctx, 4))
        s.observe(prop, Verdict([0], [], []))  # depth 1 rejected every time
    assert s.factor() < 0.5
    assert s.propose(DraftContext(ctx, 4)).scores[0] < 0.5 * d._base((3, False), 1)
    s.end()
    s = d.session()
    s.begin(ctx)
    again = s.propose(DraftContext(ctx, 4)).scores
    assert s.factor() == 1.0 and again[0] == pytest.approx(d._base((3, False), 1)) and again[0] < shared[0]


def test_pld_tree_merges_candidates_best_first():
    d = PromptLookup(max_ngram=2, branches=3)
    ctx = [1, 2, 3, 4, 9, 1, 2, 3, 5, 8, 1, 2]
    s = start(d, ctx)
    prop = s.propose(DraftContext(ctx, 5))
    # candidates: after the latest (1, 2): [3, 5, 8, 1, 2]; after the older one: [3, 4, 9, 1, 2];
    # after the 1-gram (2,) nothing new. They share the first token, so the trie has one root child.
    assert [(c, own) for _, c, own in prop.state] == [([3, 5, 8, 1, 2], 1), ([3, 4, 9, 1, 2], 2)]
    assert prop.children()[0] == {3: 0}
    assert all(p < i for i, p in enumerate(prop.parents))  # parents first
    assert all(a >= b for a, b in zip(prop.scores, prop.scores[1:]))  # best first
    primary = [prop.tokens[i] for i in range(len(prop)) if prop.tokens[i] in (3, 5, 8)][:3]
    assert primary == [3, 5, 8] and prop.tokens[1] == 5  # the primary copy outranks the alternative
    # Observation scores every candidate's own branch against the emitted tokens, pruned ones included:
    # the alternative from its depth 2 on (depth 1 is the primary's node), the primary from depth 1.
    s.observe(prop.prefix(0), Verdict([3, 4, 9], [], []))
    assert d.stats[(2, True)][0][1:4] == [1, 1, 0] and d.stats[(2, True)][1][1:4] == [1, 1, 0]
    assert d.stats[(2, False)][1][1:3] == [1, 0]


def test_ngram_table_memory_cap():
    t = NGramTable(max_contexts=50, max_children=3)
    t.add(list(range(1000)) + [0, 1, 7, 0, 1, 8, 0, 1, 9, 0, 1, 10], 0, 1.0)
    assert len(t.next) <= 50
    assert all(len(kids) <= 3 for kids in t.next.values())


def test_ngram_table_backs_off_from_the_longest_known_context():
    t = NGramTable(order=4)
    t.add([1, 2, 3, 9, 5, 2, 3, 8, 5, 2, 3, 8], 0, 1.0)
    assert t.lookup(1, 2, 3) == {9: 1.0}  # the 3-token context has seen only 9
    assert t.lookup(7, 2, 3) == {9: 1.0, 8: 2.0}  # unknown 3-token context: back off to (2, 3)
    assert t.lookup(4, 4, 6) is None


def test_ngram_builds_a_tree_of_several_branches():
    prompt = [1, 2, 3, 1, 2, 4, 1, 2, 3, 1, 2, 5, 3, 1, 2]
    s = start(NGramDrafter(table="test-tree", width=3), prompt)
    prop = s.propose(DraftContext(prompt, 8))
    assert prop is not None and not prop.is_chain
    roots = [t for t, p in zip(prop.tokens, prop.parents) if p == -1]
    assert set(roots) == {3, 4, 5} and roots[0] == 3  # most frequent continuation first
    assert all(p < i for i, p in enumerate(prop.parents))
    assert all(0 < s <= 1 for s in prop.scores)


def test_ngram_merges_in_request_suffix_matches_into_its_tree():
    prompt = [11, 12, 20, 11, 12, 20, 11, 12, 20, 11, 12, 13, 14, 15, 11, 12]
    table_only = start(NGramDrafter(table="hybrid-a", width=1, lookup=0), prompt)
    assert 13 not in table_only.propose(DraftContext(prompt, 8)).tokens  # the table's (11, 12) context prefers 20
    hybrid = NGramDrafter(table="hybrid-b", width=1, lookup=1)
    hs = start(hybrid, prompt)
    prop = hs.propose(DraftContext(prompt, 32))
    tok = dict(enumerate(prop.tokens))
    chain = [i for i in range(len(prop)) if tok[i] in (13, 14, 15)]
    assert [tok[i] for i in chain] == [13, 14, 15]  # the most recent match's copy, as one path
    assert [prop.parents[i] for i in chain] == [-1, chain[0], chain[1]]
    assert 20 in tok.values()  # next to the table's own branch
    hs.observe(prop, Verdict([13, 14, 15, 11], [], []))  # both sources learn from the same step
    assert hybrid.got > 1.0 - 1e-9 and hybrid.lookup.pooled[1][1] == 1


def test_ngram_learns_from_the_rows_of_rejected_nodes():
    d = NGramDrafter(table="rows", lookup=0, jacobi=2, rows=1.5)
    ctx = [31, 32, 33]
    s = start(d, ctx)
    assert s.propose(DraftContext(ctx, 8)) is None  # an unseen context: nothing to draft yet
    # A verified tree: root children 40 and 41 (both rejected; the target said 50), and 42 under 40.
    # Row argmaxes: root -> 50 (the bonus), after 40 -> 60, after 41 -> 61, after 40, 42 -> 62.
    state = {"edges": [], "paths": [], "tail": (32, 33), "asked": [], "lookup": None}  # as `propose` keeps it
    prop = Proposal([40, 41, 42], [-1, -1, 0], [0.5, 0.4, 0.3], state=state)
    s.observe(prop, Verdict([50], [], [50, 60, 61, 62]))
    assert d.table.next[(33, 40)] == {60: 1.5} and d.table.next[(33, 41)] == {61: 1.5}
    assert d.table.next[(40, 42)] == {62: 1.5}  # deeper rows too: the table context is the path's last two
    assert (33, 50) not in d.table.next  # the accepted row is the emitted token: counted when it is emitted
    nxt = s.propose(DraftContext(ctx + [50], 8))
    roots = {t: s for t, p, s in zip(nxt.tokens, nxt.parents, nxt.scores) if p == -1}
    assert roots == {60: 0.25, 61: 0.25}  # Jacobi guesses for the token after the bonus, at the prior rate
    s.observe(nxt, Verdict([60, 7], [], []))
    assert d.jstats == [[2.0, 5.0], [1.0, 5.0]]  # rank 1 was right, rank 2 wrong
    s.end()


def test_ngram_without_row_learning_ignores_the_rows():
    d = NGramDrafter(table="no-rows", lookup=0, jacobi=0, rows=0)
    s = start(d, [31, 32, 33])
    assert s.propose(DraftContext([31, 32, 33], 8)) is None
    state = {"edges": [], "paths": [], "tail": (32, 33), "asked": [], "lookup": None}
    prop = Proposal([40], [-1], [0.5], state=state)
    s.observe(prop, Verdict([50], [], [50, 60]))
    assert (33, 40) not in d.table.next and s.propose(DraftContext([31, 32, 33, 50], 8)) is None


def test_merge_builds_one_best_first_trie():
    a = Proposal.chain([5, 6, 7], [0.9, 0.5, 0.2])
    b = Proposal.chain([5, 8], [0.8, 0.7])
    m = merge([a, b], 10)
    assert m.tokens == [5, 8, 6, 7] and m.parents == [-1, 0, 0, 2] and m.scores == [0.9, 0.7, 0.5, 0.2]
    assert merge([a, b], 2).tokens == [5, 8] and merge([], 4) is None


def test_judge_scores_a_path_against_the_emitted_tokens():
    assert judge([4, 5], [4, 5, 6]) is True
    assert judge([4, 9], [4, 5, 6]) is False
    assert judge([3, 5], [4, 5, 6]) is None  # left the emitted path before its last token
    assert judge([4, 5, 6, 7], [4, 5, 6]) is None  # deeper than what was emitted


def test_ngram_table_is_shared_across_requests():
    """Drafters made for one engine (one shared store) count into one table per name; another engine's
    store (another model) keeps its own."""
    store = {}
    a = NGramDrafter(table="shared-test")
    start(a, [7, 8, 9, 7, 8], store)
    b = NGramDrafter(table="shared-test")
    start(b, [1], store)
    assert b.table is a.table and b.table.lookup(7, 8) == {9: 1.0}
    other = NGramDrafter(table="shared-test")
    other.prepare(Resources(tables={}))
    assert other.table is not a.table


def _save(path, offset):
    t = NGramTable()
    t.add([offset, offset + 1, offset + 2] * 50, 0, 1.0)
    for _ in range(5):
        t.save(path)


def test_ngram_persistence_merges_and_survives_concurrent_writers(tmp_path):
    path = tmp_path / "ngram.json"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_save, args=(path, 100 * i)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    data = json.loads(path.read_text())  # a complete, valid file
    merged = NGramTable()
    merged.load(path)
    assert all(merged.lookup(100 * i, 100 * i + 1) for i in range(3))  # every writer's counts are there
    assert data["format"] == 1
    s = start(NGramDrafter(table="persist-test", path=str(path)), [0, 1])
    assert s.propose(DraftContext([0, 1], 3)).tokens[0] == 2


def test_persisted_ngram_table_stays_within_the_cap(tmp_path):
    path = tmp_path / "capped.json"
    for offset in range(0, 400, 100):  # four processes' worth of different tables, merged into one file
        t = NGramTable(max_contexts=60, max_children=2)
        t.add([offset + i for i in range(50)] + [offset, 7, offset, 8, offset, 9], 0, 1.0)
        t.save(path)
    rows = json.loads(path.read_text())["rows"]
    assert len(rows) <= 60 and all(len(kids) <= 2 for _, kids in rows)
    loaded = NGramTable(max_contexts=60, max_children=2)
    loaded.load(path)
    assert loaded.lookup(348) == {349: 1.0}  # the newest rows are the ones kept
    assert loaded.lookup(0) is None  # the oldest were evicted


def test_corrupt_ngram_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SkipjackError, match="table .* is damaged"):
        NGramDrafter(table="bad", path=str(bad)).prepare(Resources())  # read before any request


@pytest.mark.parametrize(
    "spec",
    ["pld:k=65", "pld:k=-1", "pld:max_ngram=0", "pld:min_ngram=4,max_ngram=3", "ngram:explore=-1", "ngram:width=9"]
    + ["ngram:lookup=9", "ngram:order=7", "x", "pld:k=abc", "pld:k=1.5", "ngram:explore=lots"]
    + ["ngram:jacobi=9", "ngram:jacobi=-1", "ngram:rows=5", "ngram:rows=-0.5"],
)
def test_out_of_range_options(spec):
    with pytest.raises(SkipjackError):
        MethodSpec.parse(spec)


def test_parse_method():
    m = MethodSpec.parse("pld:k=8, max_ngram=4")
    assert (m.name, m.options, m.k) == ("pld", {"max_ngram": 4}, 8)
    assert build(MethodSpec.parse("plain")) is None and MethodSpec.parse("plain").lossless
    ng = build(MethodSpec.parse("ngram:explore=1,path=7,table=2"))  # values take their option's type
    assert ng.explore == 1.0 and isinstance(ng.explore, float) and str(ng.path) == "7"
    d = build(MethodSpec.parse("pld:k=8"))
    assert d.name == "pld" and d.lossless and not hasattr(d, "fixed_length")
    with pytest.raises(SkipjackError, match="shared"):
        MethodSpec.parse("ngram:shared=1")  # the engine's store is not a user option
    with pytest.raises(SkipjackError):
        MethodSpec.parse("plain:k=1")


def test_mix_hands_model_to_the_parts_that_draft_with_one():
    m = MethodSpec.parse("mix:of=pld+draft,model=qwen2.5-coder-0.5b")
    assert [p.spec for p in m.parts] == ["pld", "draft:model=qwen2.5-coder-0.5b"]
    mix = build(m)  # built, not prepared: nothing loaded
    assert [p.name for p in mix.parts] == ["pld", "draft"] and mix.parts[1].source == "qwen2.5-coder-0.5b"
