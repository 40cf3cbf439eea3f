"""`skipjack.bench.loadgen`, the aiperf-driven server bench, without aiperf itself (its own virtual environment
is `make bench-serve`'s): the tokenizer's HF-cache layout loads offline in transformers and tokenizes as ours,
the command line a run gives aiperf, the parsing of its exports (per-turn TTFT included), the table, and
one-line errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
from conftest import make_tiny_model

from skipjack.bench import loadgen, serve

FAKE = r"""#!{python}
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
Path(os.environ["FAKE_ARGS"]).write_text(json.dumps(args + [os.environ.get("HF_HUB_OFFLINE", "")]))
out = Path(args[args.index("--output-artifact-dir") + 1])
out.mkdir(parents=True, exist_ok=True)
m = lambda v, **k: dict(unit="ms", avg=v, p50=v, p95=v * 2, **k)
(out / "profile_export_aiperf.json").write_text(json.dumps({
    "output_token_throughput": {"unit": "tokens/sec", "avg": 120.0},
    "completed_request_count": {"avg": 4.0}, "effective_concurrency": {"avg": 2.0},
    "time_to_first_token": m(100.0), "inter_token_latency": m(8.0), "request_error_rate": {"avg": 0.0}}))
rows = [(0, 300.0), (1, 30.0), (0, 500.0), (1, 50.0), (0, 9999.0)]
with open(out / "profile_export.jsonl", "w") as f:
    for i, (turn, ttft) in enumerate(rows):
        phase = "warmup" if i == 4 else "profiling"
        f.write(json.dumps({"metadata": {"turn_index": turn, "benchmark_phase": phase},
                            "metrics": {"time_to_first_token": {"value": ttft, "unit": "ms"}}}) + "\n")
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def fake_aiperf(tmp_path, monkeypatch) -> tuple[Path, Path]:
    exe = tmp_path / "aiperf"
    exe.write_text(FAKE.replace("{python}", sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("FAKE_ARGS", str(tmp_path / "args.json"))
    return exe, tmp_path / "args.json"


def test_the_tokenizer_in_an_hf_cache_layout_loads_offline_and_tokenizes_as_ours(tiny, tmp_path):
    """In a fresh process, as aiperf loads it: HF_HOME pointing at the layout, the hub offline."""
    from skipjack.loading.load import load

    repo = loadgen.hf_cache(str(tiny), tmp_path / "hf")
    text = "The quick brown fox jumps over the lazy dog, twice."
    code = (
        "import json, sys; from transformers import AutoTokenizer; "
        f"t = AutoTokenizer.from_pretrained({repo!r}); "
        "print(json.dumps(t.encode(sys.argv[1], add_special_tokens=False)))"
    )
    env = os.environ | {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code, text], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    assert json.loads(r.stdout) == load(str(tiny)).tokenizer.encode(text, False)


def test_a_run_asks_aiperf_for_the_workload_and_reads_its_exports(fake_aiperf, tmp_path):
    exe, args_file = fake_aiperf
    a = Namespace(aiperf=str(exe), tokenizer="skipjack/tiny", isl=128, osl=64, context=1024, hf_home=tmp_path)
    r = loadgen.aiperf(a, "http://127.0.0.1:9", "tiny", tmp_path / "one", 2, 8)
    args = json.loads(args_file.read_text())
    assert args[-1] == "1"  # HF_HUB_OFFLINE: nothing is fetched
    opt = lambda k: args[args.index(k) + 1]  # noqa: E731
    assert (opt("--concurrency"), opt("--request-count"), opt("--warmup-request-count")) == ("2", "8", "2")
    assert (opt("--prompt-input-tokens-mean"), opt("--prompt-output-tokens-mean")) == ("128", "64")
    assert "ignore_eos:true" in args and "temperature:0" in args and "--streaming" in args
    assert opt("--workers-max") == "1" and "--conversation-num" not in args
    assert r["tok_s"] == 120.0 and r["ttft_p95"] == 200.0 and r["itl_p50"] == 8.0 and r["requests"] == 4
    assert r["ttft_by_turn"] == {0: 400.0, 1: 40.0}  # medians per turn; the warm-up request is left out

    loadgen.aiperf(a, "http://127.0.0.1:9", "tiny", tmp_path / "turns", 1, 6, turns=2)
    args = json.loads(args_file.read_text())
    assert (opt("--conversation-num"), opt("--conversation-turn-mean"), opt("--user-context-prompt-length")) == (
        "6",
        "2",
        "1024",
    )
    assert "--request-count" not in args


def test_a_failed_aiperf_run_is_one_line(tmp_path):
    exe = tmp_path / "aiperf"
    exe.write_text("#!/bin/sh\necho 'cannot reach the server' >&2\nexit 3\n")
    exe.chmod(0o755)
    a = Namespace(aiperf=str(exe), tokenizer="t", isl=8, osl=8, context=8, hf_home=tmp_path)
    from skipjack.errors import SkipjackError

    with pytest.raises(SkipjackError, match=r"aiperf failed \(3\): cannot reach the server"):
        loadgen.aiperf(a, "http://127.0.0.1:9", "tiny", tmp_path / "o", 1, 1)


def test_the_table_gives_ratios_to_one_stream_and_to_plain():
    run = lambda s, c, t: {  # noqa: E731
        "server": s,
        "clients": c,
        "requests": 4 * c,
        "tok_s": t,
        "ttft_p50": 10.0,
        "ttft_p95": 20.0,
        "itl_p50": 5.0,
        "itl_p95": None,
    }
    res = {
        "runs": [run("skipjack plain", 1, 100.0), run("skipjack plain", 8, 300.0), run("skipjack auto", 1, 110.0)]
        + [run("skipjack auto", 8, 330.0), run("llama-server", 1, None)],
        "turns": [{"server": "skipjack plain, prefix cache on", "requests": 12, "ttft_by_turn": {"0": 1000, "1": 150}}],
    }
    md = loadgen.table(res)
    assert "| skipjack plain | 8 | 32 | 300.0 | 3.00 | 1.00 | 10 / 20 | 5 / - |" in md
    assert "| skipjack auto | 8 | 32 | 330.0 | 3.00 | 1.10 |" in md
    assert "| llama-server | 1 | 4 | - | - | - |" in md  # nothing measured: no ratio, no crash
    assert "| skipjack plain, prefix cache on | 6 | 1000 | 150 | 0.15 |" in md


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--aiperf", "/nonexistent/aiperf"], "aiperf not found at '/nonexistent/aiperf'"),
        (["--aiperf", sys.executable, "--levels", "1,x"], "a level must be an integer"),
        (["--aiperf", sys.executable, "--levels", "0"], "a level must be"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message, tmp_path, capsys):
    assert loadgen.main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not os.path.exists(tmp_path / "o" / "loadgen.json")


def test_benchmarks_md_sections_for_the_load_generator_and_structured_output(tmp_path):
    from skipjack.bench import benchmarks_md

    machine = {"cpu": "test cpu", "cores": 2, "isa": "avx2"}
    row = {"server": "skipjack plain", "clients": 2, "requests": 8, "tok_s": 100.0, "ttft_p50": 1.0, "ttft_p95": 2.0}
    row |= {"itl_p50": 5.0, "itl_p95": 6.0}
    res = {"model": "m", "isl": 128, "osl": 64, "context": 1024, "loadgen": loadgen.AIPERF, "machine": machine}
    res |= {"runs": [row], "turns": [], "default_aiperf": row | {"tok_s": 40.0, "itl_p50": 20.0}}
    (tmp_path / "lg").mkdir()
    (tmp_path / "lg" / "loadgen.json").write_text(json.dumps(res))
    docs = tmp_path / "docs"
    docs.mkdir()
    md = benchmarks_md.loadgen_section(tmp_path / "lg", docs)
    assert "aiperf==0.13.0" in md and "| skipjack plain | 2 | 8 | 100.0 | 1.00 | 1.00 | 1 / 2 | 5 / 6 |" in md
    assert "2 streams: 40.0 tok/s, 0.40× the quiet run's 100.0; ITL p50 20 ms against 5 ms" in md
    assert (docs / "loadgen.json").exists()
    summary = {"plain": {"tok_s": 100.0, "x_constrained_plain": 1.0, "passes_per_token": 1.0, "identical": 6}}
    summary["plain"] |= {"parses": 6, "prompts": 6}
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "structured.json").write_text(
        json.dumps({"model": "m", "tokens": 160, "machine": machine, "summary": summary})
    )
    md = benchmarks_md.structured_section(tmp_path / "st", docs)
    assert "| plain | 100.0 | 1.00 | 1.00 | 6/6 | 6/6 |" in md and (docs / "structured.json").exists()


def test_the_peer_is_llama_cpps_own_server_with_a_slot_per_stream_when_built(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPJACK_HOME", str(tmp_path))
    (tmp_path / "llama-server").write_text("#!/bin/sh\n")
    label, make = serve.peer(tmp_path / "m.gguf", 16)
    cmd = make(8080)
    assert label == "llama-server" and cmd[0] == str(tmp_path / "llama-server")
    assert cmd[cmd.index("-np") + 1] == "16" and cmd[cmd.index("-c") + 1] == str(16 * 1024)
    assert cmd[cmd.index("--port") + 1] == "8080" and cmd[cmd.index("-m") + 1] == str(tmp_path / "m.gguf")
