"""lm-evaluation-harness against skipjack (issue 36): the harness's own `local-completions` client on a real
`skipjack serve` process (prompts as token ids and as text), and `skipjack eval --lm-eval` in process, on the
bundled local tasks (one multiple-choice, one generation; no hub). Scores are never asserted as figures: the
served and in-process runs must agree document by document, and the multiple-choice accuracy must be what the
log-likelihoods say."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest
from test_server import serve_process

from skipjack.errors import SkipjackError
from skipjack.evaluation import lmeval
from skipjack.evaluation.tasks import data
from skipjack.loading.load import DEFAULT_MODEL

TASKS = ["skipjack_capitals", "skipjack_capitals_gen"]
LIMIT = 6


def test_bundled_documents_are_well_formed():
    docs = data.capitals_docs()
    assert len({d["country"] for d in docs}) == len(docs) == len(data.CAPITALS)
    for d, (_, capital) in zip(docs, data.CAPITALS):
        assert len(set(d["choices"])) == 4 and d["choices"][d["answer"]] == capital
    assert {d["answer"] for d in docs} == {0, 1, 2, 3}
    assert all(d["answer"] == str(d["a"] + d["b"]) for d in data.arith_docs())


def test_task_names_from_names_files_and_folders(tmp_path):
    names, include = lmeval.task_names(["skipjack_arith"])
    assert names == ["skipjack_arith"] and include == [str(lmeval.TASKS)]
    names, include = lmeval.task_names([str(lmeval.TASKS / "capitals.yaml")])
    assert names == ["skipjack_capitals"] and include == [str(lmeval.TASKS)]  # one folder, indexed once
    names, _ = lmeval.task_names([str(lmeval.TASKS)])
    assert sorted(names) == ["skipjack_arith", "skipjack_capitals", "skipjack_capitals_gen"]
    (tmp_path / "bad.yaml").write_text("output_type: multiple_choice\n")
    (tmp_path / "broken.yaml").write_text("task: [\n")
    for spec, needle in [
        (str(tmp_path / "bad.yaml"), "needs a `task:` name"),
        (str(tmp_path / "broken.yaml"), "not a readable task file"),
        (str(tmp_path / "missing.yaml"), "no such file"),
        (str(tmp_path), "no task file"),
    ]:
        with pytest.raises(SkipjackError, match=needle):
            lmeval.task_names([spec])


def responses(run: dict, task: str) -> list:
    return [s["filtered_resps"] for s in sorted(run["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.real
def test_lm_eval_served_and_in_process_agree(tmp_path):
    """The harness's client against `skipjack serve` (token-id and text prompts) and `SkipjackLM` on the same
    model give the same log-likelihood for every choice, the same generations, and the same scores; the
    multiple-choice accuracy is the share of documents whose gold choice has the highest log-likelihood."""
    from skipjack.engine import Engine

    names, include = lmeval.task_names(TASKS)
    with serve_process(DEFAULT_MODEL) as (url, _):
        info = httpx.get(f"{url}/tokenizer_info").json()
        assert info["eos_token"] and info["model_max_length"] > 0
        method = httpx.get(f"{url}/health").json()["method"]
        runs = {tok: lmeval.evaluate(lmeval.served(url, tok), names, include, LIMIT) for tok in (True, False)}
        out = tmp_path / "out"
        cli = [sys.executable, "-m", "skipjack.cli", "eval", "--lm-eval", ",".join(TASKS), "--server", url]
        done = subprocess.run(cli + ["--limit", "2", "--out", str(out)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
    runs["local"] = lmeval.evaluate(lmeval.SkipjackLM(Engine.load(DEFAULT_MODEL)), names, include, LIMIT)
    for task in TASKS:
        assert responses(runs[True], task) == responses(runs["local"], task) == responses(runs[False], task)
        assert runs[True]["results"][task] == runs["local"]["results"][task] == runs[False]["results"][task]
    mc = runs["local"]["samples"]["skipjack_capitals"]
    assert len(mc) == LIMIT
    best = [max(range(4), key=lambda i: s["filtered_resps"][i][0]) == s["target"] for s in mc]
    assert runs["local"]["results"]["skipjack_capitals"]["acc"] == sum(best) / len(best)
    assert all(isinstance(r[0], str) for r in responses(runs["local"], "skipjack_capitals_gen"))
    row = json.loads(next(out.glob("lmeval__*.json")).read_text())
    assert row["method"] == method and row["tokenized_requests"] and row["limit"] == 2
    assert row["scores"]["skipjack_capitals"]["acc"] == sum(best[:2]) / 2
    assert "skipjack_capitals acc:" in done.stdout


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--lm-eval", "no/such/task.yaml"], "no such file"),
        (["--lm-eval", "skipjack_capitals", "--limit", "0"], "--limit"),
        (["--lm-eval", "skipjack_capitals", "--server", "http://x", "--method", "pld"], "server's own"),
        (["--lm-eval", "skipjack_capitals", "--method", "nope"], "nope"),
        (["--limit", "3"], "go with --lm-eval"),
    ],
)
def test_bad_lm_eval_arguments_are_one_line_errors(argv, needle, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "skipjack.cli", "eval", *argv, "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert done.returncode == 2 and needle in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_an_unknown_task_name_is_a_clear_error(monkeypatch):
    """Looked up in the given folders, then in lm-eval's own index (here a stand-in: indexing lm-eval's
    fourteen thousand task files takes seconds), before any model is asked anything."""
    import lm_eval.tasks

    real, seen = lm_eval.tasks.TaskManager, []

    def manager(include_path=None, include_defaults=True):
        seen.append(include_defaults)
        return real(include_path=include_path, include_defaults=False)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", manager)
    with pytest.raises(SkipjackError, match="no task named 'skipjack_nope'"):
        lmeval.evaluate(None, ["skipjack_nope"], [str(lmeval.TASKS)], 1)
    assert seen == [False, True]  # the bundled folder first, lm-eval's own index only then
