"""`skipjack eval` (the quality harness) and the sandbox HumanEval runs in: the harness's perplexity equals a
direct computation; a zero-skip strategy measures as plain; HumanEval passes a known-correct solution, fails a
wrong one, and survives hostile code (an infinite loop, a fork bomb, a write outside its folder, the network);
the CLI writes its row and refuses bad input in one line."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from conftest import byte_bpe_tokenizer, hf_model, ours_from_hf

from skipjack import sandbox
from skipjack.bench.suite import Prompt
from skipjack.cli import main as cli_main
from skipjack.engine import Engine
from skipjack.evaluation import harness, humaneval, selfcheck
from skipjack.evaluation.texts import bench_topics, documents, windows
from skipjack.loading.load import Loaded
from skipjack.loading.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def engine():
    tok = byte_bpe_tokenizer()
    m = ours_from_hf(hf_model("llama", seed=4, vocab=len(tok), max_position_embeddings=512, num_hidden_layers=6))
    return Engine(Loaded(m, Tokenizer(tok, tok.chat_template, tok.eos_token_id), "tiny", None, 0, False), None)


def test_perplexity_equals_a_direct_computation(engine):
    tok, model = engine.tokenizer, engine.model
    ws = windows(tok, 3, 20, 30)
    got = harness.perplexity(model, "plain", model, ws)
    nll, n = 0.0, 0
    for prompt, cont in ws:  # one forward over the whole window, no cache: NLL of the continuation's tokens
        logits = model(torch.tensor([prompt + cont])).logits[0].double()  # [T, V]
        lp = torch.log_softmax(logits, -1)
        for i, t in enumerate(cont):
            nll -= float(lp[len(prompt) + i - 1, t])
            n += 1
    assert got["tokens"] == n == 90
    assert got["ppl_ref"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert got["ppl"] == got["ppl_ref"] and got["top1_agreement"] == 1.0 and abs(got["kl"]) < 1e-6


def test_zero_skip_measures_as_plain_and_skipping_costs_perplexity(engine):
    ws = windows(engine.tokenizer, 2, 16, 24)
    zero = harness.perplexity(engine.model, "layer-skip:ratio=0", engine.model, ws)
    assert zero["ppl_increase"] == 0 and zero["top1_agreement"] == 1.0
    lossy = harness.perplexity(engine.model, "layer-skip:ratio=0.5", engine.model, ws)
    assert lossy["kl"] > 0 and lossy["top1_agreement"] < 1.0


def test_texts_leave_out_the_benchmark_prompts_text():
    prose, code = documents()
    from pydoc_data.topics import topics

    used = bench_topics()
    assert {"with", "class", "dict"} <= used and len(prose) >= 10 and len(code) >= 8
    assert not any(topics[t] in prose for t in used)


def test_greedy_rows_count_identical_outputs_and_skips(engine):
    prompts = [Prompt(f"p{i}", "x", [{"role": "user", "content": t}]) for i, t in enumerate(["hello", "abc abc"])]
    same = harness.greedy(engine, "layer-skip:ratio=0", engine, prompts, 8)
    assert same["identical"] == 2 and same["skipped"]["layers_skipped_share"] == 0
    lossy = harness.greedy(engine, "layer-skip:ratio=0.5", engine, prompts, 8)
    assert lossy["skipped"]["layers_skipped_share"] == pytest.approx(3 / 6) and lossy["speedup"] > 0


def test_selfcheck_items_and_checks():
    items = selfcheck.items()
    assert len(items) == 47 and len({i["id"] for i in items}) == 47
    cap = next(i for i in items if i["id"] == "capital-France")
    assert selfcheck.check(cap, "The capital of France is Paris.") and not selfcheck.check(cap, "Lyon")
    copy = items[0]
    assert selfcheck.check(copy, "Sure: " + copy["answer"]) and not selfcheck.check(copy, copy["answer"][:-5])


def test_humaneval_passes_the_canonical_solution_and_fails_a_wrong_one():
    p = humaneval.problems()[0]
    assert humaneval.passes(p, p["canonical_solution"]).passed
    wrong = humaneval.passes(
        p, "    return not " + p["canonical_solution"].strip().splitlines()[-1].split("return")[-1]
    )
    assert not wrong.passed and wrong.status == "failed"
    cut = humaneval.cut(p["canonical_solution"] + "\n\ndef extra():\n    pass\n")
    assert "extra" not in cut


HOSTILE = {
    "infinite loop": ("while True:\n    pass", "timeout"),
    "fork bomb": ("import posix\nwhile True:\n    try:\n        posix.fork()\n    except OSError:\n        pass", None),
    "network": ("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)", "failed"),
    "memory": ("x = bytearray(4 << 30)", "failed"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_sandbox_survives_hostile_code(name):
    code, status = HOSTILE[name]
    out = sandbox.run(code, timeout=3)
    assert not out.passed and (status is None or out.status == status)
    if os.geteuid() == 0:  # nothing of the child's user is left running
        left = [p for p in os.listdir("/proc") if p.isdigit() and _uid(p) == sandbox.NOBODY]
        assert not left


def _uid(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def test_sandbox_stops_a_write_outside_its_folder(tmp_path):
    walls = sandbox.probe()
    if not any(w.startswith("landlock") for w in walls):  # a world-writable folder: only Landlock stops it
        pytest.skip(f"no Landlock on this kernel: a write to a world-writable folder is not stopped ({walls})")
    target = tmp_path / "escaped.txt"
    os.chmod(tmp_path, 0o777)  # writable by anyone: only the sandbox's own walls stop the write
    code = f"import posix\nfd = posix.open({str(target)!r}, posix.O_CREAT | posix.O_WRONLY)\nposix.write(fd, b'x')"
    out = sandbox.run(code, timeout=5)
    assert not out.passed and not target.exists()
    assert sandbox.run("open('inside.txt', 'w').write('ok')\nassert open('inside.txt').read() == 'ok'").passed


def test_eval_cli_writes_a_row(engine, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(harness.Engine, "load", classmethod(lambda cls, spec, dtype="auto", **k: engine))
    monkeypatch.setattr(harness, "QUICK", harness.Settings(2, 16, 24, "quick", 8, 8, 4, 16))
    short = [Prompt(f"p{i}", "x", [{"role": "user", "content": t}]) for i, t in enumerate(["hi", "ab ab"])]
    monkeypatch.setattr("skipjack.bench.suite.load_suite", lambda name: short)
    args = ["eval", "--model", "tiny", "--dtype", "fp32", "--quick", "--task", "selfcheck", "--out", str(tmp_path)]
    assert cli_main([*args, "--method", "layer-skip:ratio=0.5"]) == 0
    row = json.loads(next(tmp_path.glob("tiny__layer-skip*.json")).read_text())
    assert row["lossless"] is False and row["task"]["name"] == "selfcheck" and row["task"]["items"] == 4
    assert row["skipped"]["layers_skipped_share"] > 0 and "lossy" in capsys.readouterr().out
    assert len(list(tmp_path.glob("plain-*.json"))) == 1  # plain's outcomes, reused by the next row
    assert cli_main([*args, "--method", "plain"]) == 0
    plain = json.loads(next(tmp_path.glob("tiny__plain*.json")).read_text())
    assert plain["lossless"] and plain["task"]["score"] == plain["task"]["score_plain"]


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--method", "layer-skip:ratio=1"], r"ratio must be a number in \[0, 1\)"),
        (["--method", "magic"], "unknown method"),
        (["--task", "chess"], "invalid choice"),
    ],
)
def test_eval_cli_bad_input_is_one_line(extra, pattern, tmp_path, capsys):
    assert cli_main(["eval", "--out", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and __import__("re").search(pattern, err)


def test_eval_out_that_is_a_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert cli_main(["eval", "--method", "plain", "--out", str(f)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
