"""`skipjack bench`: schema, plots, identical_fraction, missing peers, bad input, Ctrl-C, BENCHMARKS.md.

Runs the benchmark once on a tiny random Llama (word-level tokenizer built from the quick suite's words, so the
long prompt stays a few thousand tokens) and checks what it wrote. Nothing here asserts on timings.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_model

from skipjack.bench import benchmarks_md, machine, render
from skipjack.cli import main as cli_main


def _perturbed(orig):
    """Engine.complete, except that method `lossy-test` gets a wrong extra token on even-length prompts."""

    def complete(engine, request, *args, **kw):
        res = orig(engine, request, *args, **kw)
        if res.method == "lossy-test" and len(request.prompt) % 2 == 0:
            res.tokens = [*res.tokens, 0]
            res.new_tokens += 1
        return res

    return complete


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def bench_out(tiny, tmp_path_factory):
    """One benchmark run shared by the tests below: our methods, a lossy test method, HF and llama.cpp peers."""
    from skipjack.drafters.pld import PromptLookup
    from skipjack.engine import Engine
    from skipjack.methods import REGISTRY

    class LossyTest(PromptLookup):
        lossless = False

    out = tmp_path_factory.mktemp("bench") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(machine, "BANDWIDTH_MB", 16)
        mp.setitem(sys.modules, "llama_cpp", None)  # as on a machine without llama-cpp-python: import fails
        mp.setattr(Engine, "complete", _perturbed(Engine.complete))
        mp.setitem(REGISTRY, "lossy-test", LossyTest)
        argv = ["bench", "--model", str(tiny), "--suite", "quick", "--methods", "pld,ngram,pld:k=4,lossy-test"]
        argv += ["--peers", "hf,llamacpp", "--max-new-tokens", "8", "--repeats", "2", "--out", str(out)]
        assert cli_main(argv) == 0
    return out, json.loads((out / "results.json").read_text())


def test_schema_and_plots(bench_out):
    out, res = bench_out
    assert res["complete"] is True and res["suite"] == "quick"
    assert "skipjack bench --suite quick" in res["command"] and "--out" in res["command"]
    for key in ("cpu", "cores", "torch", "bandwidth_gbs", "date"):
        assert res["machine"][key] is not None, key
    assert res["machine"]["bandwidth_gbs"] > 0
    assert res["model"]["weight_bytes"] > 0
    assert res["settings"]["methods"][0] == "plain"
    assert len(res["prompts"]) + len(res["skipped"]) == 6
    cats = {p["category"] for p in res["prompts"]}
    assert cats == {"chat", "summarization", "rag", "code", "math", "long"}
    run_keys = {"id", "category", "method", "new_tokens", "seconds", "tokens_per_s", "tokens_per_pass", "accept_hist"}
    run_keys |= {"identical", "tokens", "forward_passes", "prefill_seconds"}
    ran = ["plain", "pld", "ngram", "pld:k=4", "lossy-test", "hf"]
    assert {r["method"] for r in res["runs"]} == set(ran)
    for r in res["runs"]:
        assert run_keys <= set(r), run_keys - set(r)
        assert r["new_tokens"] == len(r["tokens"]) <= 8 + (r["method"] == "lossy-test")
        assert r["seconds"] > 0 and len(r["seconds_all"]) == 2
    assert len(res["runs"]) == len(ran) * len(res["prompts"])
    for name in ran:
        s = res["summary"][name]
        for key in ("tokens_per_s", "speedup_vs_plain", "speedup_vs_hf", "tokens_per_pass", "identical_fraction"):
            assert s[key] is not None, (name, key)
        for key in ("peak_rss_mb", "bandwidth_utilisation", "lossless", "by_category", "accept_hist"):
            assert key in s, (name, key)
        assert s["peak_rss_mb"] > 0 and s["bandwidth_utilisation"] > 0
        assert set(s["by_category"]) == cats
        for c in s["by_category"].values():
            assert {"tokens_per_s", "speedup_vs_plain", "tokens_per_pass"} <= set(c)
    plain = res["summary"]["plain"]
    assert plain["speedup_vs_plain"] == pytest.approx(1.0)
    assert plain["identical_fraction"] == 1.0 and plain["lossless"] is True
    tot = [r for r in res["runs"] if r["method"] == "pld"]
    want = sum(r["new_tokens"] for r in tot) / sum(r["seconds"] for r in tot)
    assert res["summary"]["pld"]["tokens_per_s"] == pytest.approx(want)
    for m in ("pld", "ngram"):  # per-run draft steps add up (whether a random tiny model's output repeats the
        # prompt, which pld needs, depends on the CPU's rounding: some drafter must have drafted)
        assert res["summary"][m]["draft_steps"] == sum(r["draft_steps"] for r in res["runs"] if r["method"] == m)
    assert max(res["summary"][m]["draft_steps"] for m in ("pld", "ngram", "pld:k=4")) > 0
    # Decode-phase rate: tokens after the first over seconds after the first token; peers have none.
    want = sum(r["new_tokens"] - 1 for r in tot) / sum(r["seconds"] - r["prefill_seconds"] for r in tot)
    assert res["summary"]["pld"]["decode_tokens_per_s"] == pytest.approx(want)
    assert all(0 < r["prefill_seconds"] < r["seconds"] for r in tot)
    assert res["summary"]["plain"]["decode_speedup_vs_plain"] == pytest.approx(1.0)
    assert res["summary"]["hf"]["decode_speedup_vs_plain"] is None
    # Drafting's share of the time: the drafter's propose calls over the run's seconds; none for peers.
    spent = sum(r["draft_seconds"] for r in tot)
    assert res["summary"]["pld"]["draft_share"] == pytest.approx(spent / res["summary"]["pld"]["seconds"])
    assert 0 < res["summary"]["pld"]["draft_share"] < 1 and res["summary"]["hf"]["draft_share"] is None
    assert res["summary"]["plain"]["draft_share"] == 0 and "drafting: share of time" in (out / "REPORT.md").read_text()
    for png in render.PLOTS:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    md = (out / "REPORT.md").read_text()
    assert "## Overall" in md and "## Speedup vs plain by category" in md and "## Acceptance" in md
    # The verify-cost curves the speculative methods' cost model learned in this run, and their table.
    curves = res["cost_curves"]
    assert curves[0]["context"] == [0, 512] and curves[0]["plain_steps"] + curves[0]["verify_steps"] > 0
    for c in curves:
        costs = list(c["cost"].values())
        assert costs == sorted(costs) and costs[0] >= 1.0
    assert "## Verify cost" in md and "| 0–512 |" in md
    rows = res["linear_rows"]
    assert sorted(map(int, rows["ms"])) == list(range(1, 13)) and set(rows["pads"]) == set(rows["ms_by_shape"])
    assert all(v > 0 for v in rows["ms"].values()) and "**Linear layers by input rows**" in md


def test_cold_and_warm_drafters_are_labelled(bench_out, tmp_path):
    """A method with a drafter has cold figures (the headline: a run's and a summary's own keys) and warm ones
    (`warm`), each labelled in results.json, REPORT.md and BENCHMARKS.md; plain and the peers have neither."""
    out, res = bench_out
    for r in res["runs"]:
        if r["method"] in ("plain", "hf"):
            assert r["drafter"] is None and "warm" not in r
            continue
        w = r["warm"]
        assert r["drafter"] == "cold" and w["drafter"] == "warm" and "warm" not in w
        assert (w["id"], w["method"], len(w["seconds_all"])) == (r["id"], r["method"], 2)
        assert w["identical"] is (w["tokens"] == next(p["tokens"] for p in res["runs"] if p["id"] == r["id"]))
    for name in ("plain", "hf"):
        assert res["summary"][name]["drafter"] is None and res["summary"][name]["warm"] is None
    s = res["summary"]["ngram"]
    assert s["drafter"] == "cold" and s["warm"]["drafter"] == "warm" and s["warm"]["prompts"] == s["prompts"]
    warm = [r["warm"] for r in res["runs"] if r["method"] == "ngram"]
    want = sum(r["new_tokens"] for r in warm) / sum(r["seconds"] for r in warm)
    assert s["warm"]["tokens_per_s"] == pytest.approx(want) and s["warm"]["speedup_vs_plain"] is not None
    md = (out / "REPORT.md").read_text()
    assert "× plain (warm)" in md and "tokens/pass (warm)" in md and render.COLD_WARM in md
    assert "## Speedup vs plain by category (cold)" in md and "drafters cold (fresh on every prompt)" in md
    assert "instruction sets: " in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| plain |"))
    assert "| – |" in row  # plain has no warm figure
    target = tmp_path / "BENCHMARKS.md"
    assert benchmarks_md.main([str(out), "--benchmarks-md", str(target), "--extra", f"Again={out}"]) == 0
    assert target.read_text().count(render.COLD_WARM) == 2  # the main run's and the extra section's
    assert "warm" in render.summary_text(res).splitlines()[0]


def test_lossless_methods_and_hf_peer_match_plain(bench_out):
    """The bench's identity bookkeeping on drafters that really drafted (on this random tiny model pld's
    drafts are rejected and ngram's are accepted; test_speculative proves identity under acceptance)."""
    _, res = bench_out
    for name in ("pld", "ngram", "pld:k=4", "hf"):
        assert res["summary"][name]["identical_fraction"] == 1.0, name
        assert all(r["identical"] for r in res["runs"] if r["method"] == name)
    # A fixed draft size drafts whatever the timing; the cost-sized ones draft only where the measured costs say it
    # pays, which a busy machine can deny (timing must not decide a test).
    assert res["summary"]["pld:k=4"]["draft_steps"] > 0


def test_identical_fraction_is_computed(bench_out):
    out, res = bench_out
    lossy = [r for r in res["runs"] if r["method"] == "lossy-test"]
    plain = {r["id"]: r["tokens"] for r in res["runs"] if r["method"] == "plain"}
    even = {p["id"] for p in res["prompts"] if p["prompt_tokens"] % 2 == 0}
    assert even, "the perturbation needs at least one even-length prompt"
    for r in lossy:
        assert r["identical"] is (r["id"] not in even)
        assert r["identical"] is (r["tokens"] == plain[r["id"]])
    s = res["summary"]["lossy-test"]
    assert s["identical_fraction"] == pytest.approx(1 - len(even) / len(lossy)) and s["identical_fraction"] < 1.0
    assert s["lossless"] is False
    md = (out / "REPORT.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| ") and "lossy-test" in ln)
    assert '<span style="color:red">' in line and "NOT IDENTICAL" in line and "lossy" in line
    assert not any("NOT IDENTICAL" in ln for ln in md.splitlines() if ln.startswith("| pld |"))


def test_missing_peer_is_reported(bench_out):
    out, res = bench_out
    assert res["peers"]["llamacpp"]["status"] == "not installed"
    assert res["peers"]["hf"]["status"] == "ok"
    s = res["summary"]["llamacpp"]
    assert s["status"] == "not installed" and s["kind"] == "peer" and s["tokens_per_s"] is None
    assert not [r for r in res["runs"] if r["method"] == "llamacpp"]
    assert "speedup_vs_llamacpp" not in res["summary"]["plain"]
    assert "`llamacpp`: not installed" in (out / "REPORT.md").read_text()


def test_benchmarks_md(bench_out, tmp_path):
    out, _ = bench_out
    target = tmp_path / "BENCHMARKS.md"
    assert benchmarks_md.main([str(out), "--benchmarks-md", str(target)]) == 0
    md = target.read_text()
    assert "skipjack bench" in md and "**Date:**" in md and "**Machine:**" in md
    for png in render.PLOTS:
        assert (tmp_path / "docs" / "bench" / png).exists()
        assert f"(docs/bench/{png})" in md
    # A second run appended as a section, then hand-written notes; a bad --extra is a one-line error.
    notes = tmp_path / "notes.md"
    notes.write_text("## Notes\n\nhand-written\n")
    argv = [str(out), "--benchmarks-md", str(target), "--extra", f"Sizing={out}", "--notes", str(notes)]
    assert benchmarks_md.main(argv) == 0
    md = target.read_text()
    assert "## Sizing" in md and md.rstrip().endswith("hand-written") and md.count("## Targets") == 1
    assert (tmp_path / "docs" / "bench" / "results.json").exists()
    assert (
        f"docs/bench/results-{out.name}.json" in md
        and (tmp_path / "docs" / "bench" / f"results-{out.name}.json").exists()
    )
    assert benchmarks_md.main([str(out), "--benchmarks-md", str(target), "--extra", "nodir"]) == 2


def test_probe_beside_the_measured_methods(bench_out, tmp_path):
    """BENCHMARKS.md's layer-probe section puts what the probe expected of swift and del next to what a run on
    the same model measured, and the drafters' choices are listed."""
    from skipjack.bench.layers import versus

    _, res = bench_out
    name = res["model"]["name"]
    probe = {"model": name, "swift_best_value": 0.93, "del_best": {"exit": 3, "value": 0.71}}
    (tmp_path / "p.json").write_text(json.dumps(probe))
    fake = json.loads(json.dumps(res))
    fake["summary"]["swift"] = fake["summary"]["pld"] | {"decode_speedup_vs_plain": 1.01}
    fake["summary"]["kangaroo"] = fake["summary"]["pld"]
    fake["drafters"] = {"kangaroo": {"layers": 2, "adapter": {"agreement": 0.338}}, "swift": {"skip_ffn": [3]}}
    table = versus(tmp_path, [fake])
    assert f"| {name} | `swift` | 0.93 | 1.01× |" in table and "top-1 agreement 34%" in table
    assert "del" not in table.split("\n", 2)[2]  # no del run: no row
    assert render.drafters_line(fake) == ['- `kangaroo`: layers: 2, adapter: {"agreement": 0.338}',
                                          '- `swift`: skip_ffn: [3]']  # fmt: skip
    assert versus(tmp_path, [res | {"model": {"name": "another"}}]) == ""


def test_targets_are_computed_from_the_summary():
    def s(tps, cats=None, **kw):
        by = {c: {"tokens_per_s": v} for c, v in (cats or {}).items()}
        return {"status": "ok", "prompts": 3, "tokens_per_s": tps, "by_category": by, **kw}

    summary = {
        "plain": s(10.0, speedup_vs_hf=1.6),
        "pld": s(16.0, {"chat": 12.0, "math": 20.0}, speedup_vs_plain=1.6, decode_speedup_vs_plain=1.8),
        "ngram": s(15.0, {"chat": 13.0, "math": 19.0}),
        "pld:k=4": s(17.0),
        "pld:k=8": s(12.0),
        "hf": s(6.0),
    }
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in render.targets(summary).splitlines()[2:]}
    assert "| met |" in rows["plain vs HF `generate` greedy"]
    assert "1.08×" in rows["ngram vs pld, chat"] and "| met |" in rows["ngram vs pld, chat"]
    assert "0.95×" in rows["ngram vs pld, math"] and "missed" in rows["ngram vs pld, math"]
    assert "0.94×" in rows["pld (cost model) vs best fixed size (pld:k=4)"]
    assert "pld vs HF prompt lookup" not in rows  # hf-pld did not run
    assert render.targets({"plain": s(10.0)}) == ""
    # The self-speculation targets: set for Qwen2.5-Coder-1.5B runs only, over the best of several methods.
    q = "qwen2.5-coder-1.5b"
    summary |= {
        "del": s(9.0, speedup_vs_plain=0.9),
        "kangaroo": s(12.0, speedup_vs_plain=1.2),
        "draft:model=qwen2.5-coder-0.5b": s(14.0, speedup_vs_plain=1.4, **{"speedup_vs_hf-assist": 1.35}),
        "hf-assist": s(8.0),
        "mix:of=pld+draft,model=qwen2.5-coder-0.5b": s(18.0),
    }
    assert "best layer-drafting" not in render.targets(summary)  # another model's run
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in render.targets(summary, q).splitlines()[2:]}
    assert "1.20×" in rows["best layer-drafting method (kangaroo) vs our plain, Qwen2.5-Coder-1.5B"]
    assert "| met |" in rows["draft model (0.5B) vs HF assistant_model, same pair"]
    best = "best combined tree (mix:of=pld+draft,model=qwen2.5-coder-0.5b) vs best single drafter (pld:k=4)"
    assert "1.06×" in rows[best] and "| met |" in rows[best]


def test_targets_table_is_built_from_targets_json(tmp_path, monkeypatch):
    """The targets are data: a target taken out of targets.json leaves the table, a changed `want` shows."""
    from skipjack.bench import summary as numbers

    def s(tps, cats, **kw):
        return {"status": "ok", "prompts": 3, "tokens_per_s": tps, "by_category": cats, **kw}

    summary = {
        "plain": s(10.0, {}),
        "pld": s(16.0, {"chat": {"tokens_per_s": 12.0}}, speedup_vs_plain=1.6),
        "ngram": s(15.0, {"chat": {"tokens_per_s": 13.0}}),
    }
    assert "| ngram vs pld, chat | 1.08× | ≥ 1.00× | met |" in render.targets(summary)
    data = json.loads(numbers.TARGETS_FILE.read_text(encoding="utf-8"))
    data["targets"] = [t for t in data["targets"] if t["label"] != "ngram vs pld, chat"]
    for t in data["targets"]:
        if t["key"] == "speedup_vs_plain":
            t["want"] = 2.0
    patched = tmp_path / "targets.json"
    patched.write_text(json.dumps(data))
    monkeypatch.setattr(numbers, "TARGETS_FILE", patched)
    table = render.targets(summary)
    assert "ngram vs pld, chat" not in table
    assert "| pld vs our plain | 1.60× | ≥ 2.00× | " in table and "missed" in table


def test_upgrade_maps_an_old_results_file(bench_out, tmp_path):
    """A results.json from before `mean_accepted` became `tokens_per_pass` reads as the current schema (keys
    renamed in place, order kept), and BENCHMARKS.md from it is the same as from the current file."""
    from skipjack.bench.schema import read_results, upgrade

    out, res = bench_out
    old = {
        "runs": [{"id": "a", "mean_accepted": 1.5, "accept_hist": {}}],
        "summary": {"pld": {"kind": "method", "mean_accepted": 1.5, "by_category": {"chat": {"mean_accepted": 2.0}}}},
    }
    new = upgrade(old)
    assert new["runs"] == [{"id": "a", "tokens_per_pass": 1.5, "accept_hist": {}}]
    assert list(new["summary"]["pld"]) == ["kind", "tokens_per_pass", "by_category"]
    assert new["summary"]["pld"]["by_category"]["chat"] == {"tokens_per_pass": 2.0}
    assert upgrade(json.loads(json.dumps(res))) == res  # a current file is left as it is
    text = (out / "results.json").read_text()
    mds = []
    for name, raw in (("current", text), ("old", text.replace('"tokens_per_pass"', '"mean_accepted"'))):
        run = tmp_path / name / "run"
        run.mkdir(parents=True)
        (run / "results.json").write_text(raw)
        assert ('"mean_accepted"' in raw) == (name == "old")
        for png in render.PLOTS:
            (run / png).write_bytes((out / png).read_bytes())
        assert read_results(run) == res
        assert benchmarks_md.main([str(run), "--benchmarks-md", str(tmp_path / name / "BENCHMARKS.md")]) == 0
        mds.append((tmp_path / name / "BENCHMARKS.md").read_text())
    assert mds[0] == mds[1]


def test_job_order_rotates_through_every_position():
    from skipjack.bench.runner import rotated

    jobs = ["plain", "pld", "ngram", "hf"]
    orders = [rotated(jobs, k) for k in range(8)]
    assert orders[0] == jobs and orders[1] == ["pld", "ngram", "hf", "plain"]
    for pos in range(len(jobs)):  # over 2 full cycles, each job holds each position exactly twice
        assert sorted(o[pos] for o in orders) == sorted(jobs * 2)
    for o in orders:  # every order is a permutation of the jobs
        assert sorted(o) == sorted(jobs)


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--methods", "plain,bogus"], "unknown method 'bogus'"),
        (["--methods", "pld:zz=1"], "unknown option"),
        (["--peers", "vllm"], "unknown peer 'vllm'"),
        (["--suite", "huge"], "unknown suite"),
        (["--repeats", "1"], "--repeats must be >= 2"),
        (["--prompts", "EMPTY"], "no prompts"),
        (["--prompts", "BAD"], "not valid JSON"),
        (["--prompts", "NOUSER"], "last message must be from the user"),
        (["--out", "UNWRITABLE"], "is not writable"),
    ],
)
def test_bad_input_is_one_line(extra, pattern, tmp_path, capsys):
    (tmp_path / "EMPTY").write_text("\n\n")
    (tmp_path / "BAD").write_text('{"id": "a", "messages": [\n')
    (tmp_path / "NOUSER").write_text(json.dumps({"id": "a", "messages": [{"role": "assistant", "content": "x"}]}))
    (tmp_path / "file").write_text("x")
    subs = {"EMPTY": tmp_path / "EMPTY", "BAD": tmp_path / "BAD", "NOUSER": tmp_path / "NOUSER"}
    subs["UNWRITABLE"] = tmp_path / "file" / "sub"
    extra = [str(subs.get(x, x)) for x in extra]
    out = tmp_path / "out"
    argv = ["bench", "--model", str(tmp_path / "never-loaded"), "--out", str(out), *extra]
    if "--out" in extra[:1]:
        argv = ["bench", "--model", str(tmp_path / "never-loaded"), *extra]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("skipjack: error:")
    assert pattern in err
    assert not (out / "results.json").exists()


def test_user_prompts_and_interrupt(tiny, tmp_path, monkeypatch, capsys):
    """--prompts runs the user's prompts; Ctrl-C mid-run writes partial results marked incomplete, exit != 0."""
    from skipjack.engine import Engine

    msg = lambda i: [{"role": "user", "content": "the cat sat " * (i + 2)}]
    lines = [json.dumps({"id": f"u{i}", "category": "mine", "messages": msg(i)}) for i in range(4)]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    orig, calls = Engine.complete, []

    def complete(*args, **kw):
        calls.append(1)
        if len(calls) == 2 + 2 * 6 + 1:  # warm-up (2 methods), u0 and u1 (plain, pld cold and warm; 2 repeats), stop
            raise KeyboardInterrupt
        return orig(*args, **kw)

    monkeypatch.setattr(machine, "BANDWIDTH_MB", 16)
    monkeypatch.setattr(Engine, "complete", complete)
    out = tmp_path / "out"
    argv = ["bench", "--model", str(tiny), "--prompts", str(tmp_path / "p.jsonl"), "--methods", "pld"]
    argv += ["--max-new-tokens", "4", "--repeats", "2", "--out", str(out)]
    assert cli_main(argv) == 130
    res = json.loads((out / "results.json").read_text())
    assert res["complete"] is False and res["suite"] == "custom"
    assert {r["id"] for r in res["runs"]} == {"u0", "u1"}
    assert res["summary"]["pld"]["by_category"]["mine"]["prompts"] == 2
    assert "Partial results" in (out / "REPORT.md").read_text()
    assert "interrupted" in capsys.readouterr().err


def test_llamacpp_peer_with_a_stand_in_module(monkeypatch, tmp_path):
    """The llama.cpp wrapper (`make test` does not build llama-cpp-python) against a stand-in `llama_cpp`: greedy
    settings, no KV prefix reuse between runs, stop token stripped, budget respected, forward passes counted,
    logits for the whole prompt; a non-GGUF is refused."""
    import sys
    import types
    from types import SimpleNamespace

    from skipjack.bench import peers

    seen = {}

    class Llama:
        def __init__(self, model_path, **kw):
            self.model_path, self.n_tokens = model_path, 0
            seen["init"] = kw

        def reset(self):
            self.n_tokens = 0

        def eval(self, tokens):
            self.n_tokens += len(tokens)

        def generate(self, tokens, **kw):
            seen["generate"] = kw
            assert self.n_tokens == 0  # reset() before each request
            self.eval(tokens)
            for t in [5, 6, 7, 2, 9]:
                yield t
                self.eval([t])

    mod = types.ModuleType("llama_cpp")
    mod.Llama = Llama
    spec = types.ModuleType("llama_cpp.llama_speculative")
    spec.LlamaPromptLookupDecoding = lambda num_pred_tokens: ("draft", num_pred_tokens)
    monkeypatch.setitem(sys.modules, "llama_cpp", mod)
    monkeypatch.setitem(sys.modules, "llama_cpp.llama_speculative", spec)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    got = peers.make_peers(["llamacpp", "llamacpp-pld"], SimpleNamespace(source=gguf), "fp32", 256)
    assert all(p.status == "ok" for p in got.values())
    assert seen["init"]["draft_model"] == ("draft", peers.NUM_PRED_TOKENS) and seen["init"]["n_ctx"] == 256
    assert seen["init"]["logits_all"] is True  # its logits buffer must hold the whole prompt (library quirk)
    out = got["llamacpp"].run([1, 3, 4], 8, 0.0, 0, frozenset({2}))
    assert out.tokens == [5, 6, 7] and out.forward_passes == 3 and out.seconds >= 0
    assert seen["generate"]["temp"] == 0.0 and seen["generate"]["top_k"] == 1
    assert got["llamacpp"].run([1, 3, 4], 2, 0.0, 0, frozenset({2})).tokens == [5, 6]
    folder = peers.make_peers(["llamacpp"], SimpleNamespace(source=tmp_path), "fp32", 256)["llamacpp"]
    assert folder.status.startswith("unavailable") and "GGUF" in folder.status
    # llamacpp-draft: a second llama.cpp instance behind the draft-model hook, for a named pair only.
    spec.LlamaDraftModel = object
    lone = peers.make_peers(["llamacpp-draft"], SimpleNamespace(source=gguf, name="x"), "fp32", 256)
    assert "no draft model" in lone["llamacpp-draft"].status
    monkeypatch.setattr("skipjack.loading.load.fetch_named", lambda name: tmp_path / f"{name}.gguf")
    pair = SimpleNamespace(source=gguf, name="qwen2.5-coder-1.5b")
    assert peers.make_peers(["llamacpp-draft"], pair, "fp32", 256)["llamacpp-draft"].status == "ok"
    draft = seen["init"]["draft_model"]
    assert draft.llm.model_path.endswith("qwen2.5-coder-0.5b.gguf") and seen["init"]["logits_all"] is True
    assert draft([1, 3, 4]).tolist() == [5, 6, 7, 2, 9] and seen["generate"]["top_k"] == 1  # greedy drafts


def test_sample_suite_is_three_prompts_of_every_category():
    from collections import Counter

    from skipjack.bench.suite import load_suite

    full, sample = load_suite("full"), load_suite("sample")
    assert {p.id for p in sample} < {p.id for p in full}
    counts = Counter(p.category for p in sample)
    assert set(counts) == {p.category for p in full} and set(counts.values()) == {3}


def test_prefill_bound_says_what_decoding_speedup_an_end_to_end_target_needs():
    """Plain: 40 s of prefill in 100 s. 1.5× end to end = 66.7 s, so decoding must go from 60 s to 26.7 s:
    2.25×. With 80 s of prefill, even free decoding cannot reach it."""

    def results(pre):
        runs = [{"method": "plain", "seconds": 50.0, "prefill_seconds": pre / 2} for _ in range(2)]
        runs += [{"method": "pld", "seconds": 40.0, "prefill_seconds": pre / 2}]
        return {"summary": {"plain": {}, "pld": {}}, "runs": runs}

    assert "40 of its 100 s (40%)" in render.prefill_bound(results(40.0))
    assert "needs 2.25× on the decoding phase" in render.prefill_bound(results(40.0))
    assert "more than any decoding speedup can give" in render.prefill_bound(results(80.0))
    assert render.prefill_bound({"summary": {"plain": {}}, "runs": results(40.0)["runs"]}) == ""


def test_self_repeat_share_counts_spans_seen_earlier_in_the_output():
    from skipjack.bench.analysis.loops import self_repeat_share

    assert self_repeat_share([]) == 0.0
    assert self_repeat_share(list(range(40))) == 0.0  # never repeats
    # A 4-token cycle, 40 tokens: the 8-grams ending at positions 11..39 (29 of them) were all seen 4 tokens earlier.
    assert self_repeat_share([1, 2, 3, 4] * 10) == pytest.approx(29 / 40)
    assert self_repeat_share([5, 6, 5, 6, 5], n=2) == pytest.approx(2 / 5)  # (5,6) and (6,5) recur once each


def test_loop_split_separates_prompts_whose_plain_output_loops():
    """Prompt a: plain's output loops, pld is 3x faster. Prompt b: clean text, pld 1.25x. Decoding phase: a is
    (10-1)/(3.33-1) = 3.86x, b is (10-2)/(8-2) = 1.33x. A lossy method is left out."""
    from skipjack.bench.analysis.loops import loop_split

    loop, clean = [1, 2, 3] * 20, list(range(60))

    def run(m, i, secs, pre, tokens):
        r = {"id": i, "method": m, "seconds": secs, "prefill_seconds": pre, "tokens": tokens}
        return r | {"new_tokens": len(tokens), "forward_passes": len(tokens) - 1, "tokens_per_pass": 1.0}

    runs = [run("plain", "a", 10.0, 1.0, loop), run("plain", "b", 10.0, 2.0, clean)]
    runs += [run("pld", "a", 10 / 3, 1.0, loop), run("pld", "b", 8.0, 2.0, clean)]
    runs += [run("lossy", "a", 1.0, 1.0, loop), run("lossy", "b", 1.0, 1.0, clean)]
    summary = {m: {"kind": "method", "identical_fraction": f} for m, f in (("plain", 1), ("pld", 1), ("lossy", 0.5))}
    head, rows, note = loop_split({"runs": runs, "summary": summary})
    assert rows == [["`pld`", "1.25×", "1.33×", "3.00×", "3.86×"]]  # `lossy` is left out
    assert "clean (1)" in head[1] and "looping (1)" in head[3] and "1 of the 2 prompts loops" in note
    assert loop_split({"runs": runs, "summary": {"plain": summary["plain"]}}) is None


def test_quality_compare_sums_nll_agreement_and_kl():
    """Against itself a model agrees everywhere with zero KL, and its NLL is the one computed from the full
    logits; in bf16 the same weights give a positive KL and nearly the same perplexity."""
    import torch
    from conftest import hf_model, ours_from_hf

    from skipjack.bench.analysis.quality import compare, summarise

    hf = hf_model("llama", seed=1, vocab=48, num_hidden_layers=2)
    ref, low = ours_from_hf(hf, torch.float32), ours_from_hf(hf, torch.bfloat16)
    ids = torch.randint(0, 48, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    same = compare(ref, ref, ids, chunk=16)  # three chunks: 16 + 16 + 7 positions
    assert same["tokens"] == 39 and same["agree"] == 39 and abs(same["kl"]) < 1e-6
    logits = ref(torch.tensor([ids])).logits[0, :-1]  # [39, V]
    direct = -torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
    assert same["nll_ref"] == pytest.approx(direct, rel=1e-5) and same["nll_other"] == same["nll_ref"]
    lossy = compare(ref, low, ids, chunk=16)
    assert lossy["kl"] > 0 and lossy["nll_ref"] == pytest.approx(direct, rel=1e-5)
    s = summarise([same, lossy])
    assert s["tokens"] == 78 and s["ppl_ref"] == pytest.approx(math.exp(direct / 39), rel=1e-5)
    assert abs(s["ppl_change"]) < 0.05 and 0.5 < s["top1_agreement"] <= 1


def test_quality_command_and_its_benchmarks_md_section(tiny, bench_out, tmp_path, capsys):
    from skipjack.bench.analysis import quality

    out, _ = bench_out
    argv = ["--model", str(tiny), "--suite", "quick", "--out", str(tmp_path / "q")]
    assert quality.main(argv) == 0
    q = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert q["dtype"] == "bf16" and q["overall"]["texts"] == 6 and len(q["rows"]) == 6
    assert "perplexity bf16" in capsys.readouterr().out
    target = tmp_path / "BENCHMARKS.md"
    assert benchmarks_md.main([str(out), "--benchmarks-md", str(target), "--quality", str(tmp_path / "q")]) == 0
    md = target.read_text()
    assert "## Quality: bf16 against fp32" in md and "| **all** | 6 |" in md
    assert (tmp_path / "docs" / "bench" / "quality.json").exists()
    assert quality.main(["--dtype", "int3", "--out", str(tmp_path / "q")]) == 2
    assert "--dtype must be one of" in capsys.readouterr().err


def test_methods_on_the_model_in_another_dtype_in_the_same_run(tiny, tmp_path, capsys):
    """`plain@bf16` and `pld@bf16` run on the model loaded in bf16 beside the fp32 methods, with fp32 `plain` as
    the reference: they are not lossless against it (whatever their identical share), and their bandwidth
    figure counts bf16 weights. An unknown dtype is a one-line error before the model load."""
    out = tmp_path / "out"
    argv = ["bench", "--model", str(tiny), "--suite", "quick", "--methods", "pld,plain@bf16,pld@bf16"]
    assert cli_main([*argv, "--max-new-tokens", "6", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    s = res["summary"]
    assert list(s) == ["plain", "pld", "plain@bf16", "pld@bf16"]
    assert s["pld"]["lossless"] is True and s["plain@bf16"]["lossless"] is False and s["pld@bf16"]["lossless"] is False
    by_dtype = res["model"]["weight_bytes_by_dtype"]
    assert by_dtype["bf16"] * 2 == by_dtype["fp32"] == s["plain"]["weight_bytes"] == 2 * s["pld@bf16"]["weight_bytes"]
    assert all(s[m]["prompts"] == 6 and s[m]["speedup_vs_plain"] for m in s)
    assert all(r["identical"] is not None for r in res["runs"])
    assert s["pld@bf16"]["identical_in_dtype"] is not None and s["pld"]["identical_in_dtype"] is None
    assert "Against plain decoding on the model in the same dtype" in (out / "REPORT.md").read_text()
    capsys.readouterr()
    code = cli_main([*argv[:-1], "plain@int3", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and "unknown dtype 'int3'" in err and len(err.strip().splitlines()) == 1


def test_headroom_command_and_its_line_in_the_report(bench_out, tmp_path, capsys):
    from skipjack.bench.analysis import headroom

    out, res = bench_out
    assert headroom.main([str(out)]) == 0
    h = json.loads((out / "headroom.json").read_text())
    assert h["prompts"] == len(res["prompts"]) and h["run_date"] == res["machine"]["date"]
    assert h["decode_speedup"] >= 1.0 and h["oracle_tokens_per_pass"] >= 1.0
    assert "Best case for any prompt-lookup drafter" in capsys.readouterr().out
    target = tmp_path / "BENCHMARKS.md"
    assert benchmarks_md.main([str(out), "--benchmarks-md", str(target)]) == 0
    assert f"{h['decode_speedup']:.2f}× on the decoding phase" in target.read_text()
    assert (tmp_path / "docs" / "bench" / "headroom.json").exists()
    (out / "headroom.json").write_text(json.dumps(dict(h, run_date="another run")))
    assert benchmarks_md.main([str(out), "--benchmarks-md", str(target)]) == 0
    assert "Best case" not in target.read_text() and "computed from another run" in capsys.readouterr().err
    (out / "headroom.json").unlink()
    assert headroom.main([str(tmp_path / "nowhere")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_methods_with_several_options_in_one_list():
    """`--methods` splits on commas, and an item `key=value` continues the method before it."""
    from skipjack.bench.suite import parse_methods
    from skipjack.errors import SkipjackError

    got = parse_methods("pld:k=8,max_ngram=4,ngram,swift:skip=a1+f2,threshold=0.5,save=0,plain@bf16")
    assert got == ["plain", "pld:k=8,max_ngram=4", "ngram", "swift:skip=a1+f2,threshold=0.5,save=0", "plain@bf16"]
    with pytest.raises(SkipjackError, match="unknown"):
        parse_methods("ngram,k=3")  # no method takes it: ngram has no ':' to continue


def test_serve_bench_agreement_batched_against_alone(tiny):
    """The serve bench's in-process agreement rows: batched greedy against alone, per dtype (q4 is batch-
    invariant: all identical), with the table the BENCHMARKS.md section shows."""
    from skipjack.bench.serve import agreement, agreement_table

    prompts = [[{"role": "user", "content": t}] for t in ("hello there", "a b c a b c", "count: 1 2 3", "x")]
    rows = agreement(str(tiny), prompts, ["q4", "fp32"], 12)
    assert [r["dtype"] for r in rows] == ["q4", "fp32"] and rows[0]["identical"] == 4 == rows[0]["prompts"]
    assert rows[0]["mean_prefix_share"] == 1.0 and 0.0 <= rows[1]["mean_prefix_share"] <= 1.0
    assert "| q4 | 4 | 4 / 4 | 100.0% |" in agreement_table(rows)
