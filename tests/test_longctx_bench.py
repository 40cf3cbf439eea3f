"""`python -m skipjack.bench.longctx`: its parts on a tiny q4 engine (accuracy, speed, perplexity), the summary
(relative accuracy, speedups, perplexity change), merging runs, the markdown table, the targets and the plots."""

from __future__ import annotations

import math

import pytest
from conftest import tiny_engine

from skipjack.bench import longctx as lc
from skipjack.bench import longctx_report as report


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with tiny_engine(tmp_path_factory.mktemp("home"), layers=2, max_position_embeddings=2048) as e:
        yield e


CONFIGS = [(lc.FULL, None), ("snapkv", 1.0), ("snapkv", 0.25), ("streaming", 0.25)]


def quiet(msg: str) -> None:
    pass


@pytest.fixture(scope="module")
def result(engine):
    res = {"model": "tiny", "dtype": "q4", "machine": {"cpu": "test"}, "command": "python -m skipjack.bench.longctx"}
    res["accuracy"] = lc.accuracy(engine, [1024], CONFIGS, 1, ["niah_single"], quiet)
    res["speed"] = lc.speed(engine, [1024], CONFIGS, ["triforce"], 6, quiet)
    res["perplexity"] = lc.perplexity(engine, [600], CONFIGS, 8, quiet)
    res["summary"] = report.summary(res)
    return res


def test_parts_measure_each_setting(result):
    acc = result["accuracy"]
    assert len(acc) == len(CONFIGS) * 2  # one niah_single task per haystack, per setting
    assert all(0.0 <= r["score"] <= 1.0 for r in acc)
    speed = {(r["policy"], r["budget"], r["method"]): r for r in result["speed"]}
    assert len(result["speed"]) == len(CONFIGS) + 2  # the full cache first and last, and triforce
    full, snap = speed[(lc.FULL, None, "plain")], speed[("snapkv", 0.25, "plain")]
    assert full["new_tokens"] == snap["new_tokens"] == 6  # no stop: every token decoded
    assert snap["kv_mb"] < full["kv_mb"] / 2  # a quarter of the keys, plus a few new ones
    assert speed[("snapkv", 1.0, "plain")]["kv_mb"] == full["kv_mb"]
    assert speed[(lc.FULL, None, "triforce")]["tokens_per_pass"] >= 1.0
    ppl = {(r["policy"], r["budget"]): r["ppl"] for r in result["perplexity"]}
    assert all(math.isfinite(v) and v > 1 for v in ppl.values())
    assert ppl[("snapkv", 1.0)] == ppl[(lc.FULL, None)]  # a budget covering the context changes nothing


def test_summary_is_relative_to_the_full_cache(result):
    s = result["summary"]
    full, same = s["1024|full|None"], s["1024|snapkv|1.0"]
    assert same["accuracy"] == full["accuracy"]
    if full["accuracy"]:
        assert full["relative_accuracy"] == 1.0 and same["relative_accuracy"] == 1.0
    assert 0.5 < full["speedup"] < 2.0  # one of the two full runs that make up the reference
    assert s["600|snapkv|1.0"]["ppl_change"] == 0.0
    assert s["1024|full|triforce"]["speedup"] > 0


def test_merge_markdown_targets_and_plots(result, tmp_path):
    later = dict(result, perplexity=[dict(r, ppl=r["ppl"] * 2) for r in result["perplexity"]])
    merged = report.merge([result, dict(later, command="second")])
    assert merged["commands"] == ["python -m skipjack.bench.longctx", "second"]
    assert merged["perplexity"] == later["perplexity"] and merged["accuracy"] == result["accuracy"]
    md = report.markdown(merged)
    assert md.count("\n| 1024 | snapkv | 0.25 |") == 1 and "| 600 | streaming | 0.25 |" in md
    t = report.targets(merged)
    assert "CAKE" in t and "not measured" in t  # no cake rows here
    assert "triforce" in t and f"{merged['summary']['1024|full|triforce']['speedup']:.2f}×" in t
    report.plots(merged, tmp_path)
    assert (tmp_path / "accuracy_vs_budget.png").stat().st_size > 1000
    assert (tmp_path / "latency_vs_context.png").stat().st_size > 1000


def test_spec_takes_options():
    assert lc.spec(lc.FULL, None) is None
    assert lc.spec("snapkv", 0.1) == "snapkv:budget=0.1"
    assert lc.spec("snapkv:chunk=1024", 0.25) == "snapkv:chunk=1024,budget=0.25"


def test_targets_compare_actqkv_with_cake():
    def summary(cake, act):
        acc = {"2048|full|None": 0.5, "2048|cake|0.1": cake, "2048|actqkv|0.1": act}
        return {"summary": {k: {"relative_accuracy": v} for k, v in acc.items() if v is not None}}

    assert "| ActQKV at a 10% budget (60%) keeps at least CAKE's accuracy | yes |" in report.targets(summary(0.5, 0.6))
    assert "| ActQKV at a 10% budget (40%) keeps at least CAKE's accuracy | no |" in report.targets(summary(0.5, 0.4))
    assert "ActQKV" not in report.targets(summary(0.5, None))  # no actqkv rows: no line
