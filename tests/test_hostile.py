"""Hostile input and faults (#22): every case exits 2 (or raises `SkipjackError` in the API) with one line that
names the problem, and leaves no file damaged or half-written. CLI option cases that fail before a model load
run in-process; cases that need a model use the tiny HF folder or a tiny GGUF (fp32: no kernel build)."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_loading import write_tiny_gguf

from skipjack import integrity, store
from skipjack.cli import main
from skipjack.errors import Fault, SkipjackError

SUR = "\udcff\udcfe"  # what undecodable argv bytes become in Python (surrogateescape)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """An empty SKIPJACK_HOME per case; afterwards nothing half-written may remain there or in tmp_path."""
    monkeypatch.setenv("SKIPJACK_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SKIPJACK_THREADS", raising=False)
    monkeypatch.delenv("SKIPJACK_LOCK_TIMEOUT", raising=False)
    yield tmp_path / "home"
    left = [p for p in tmp_path.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial")]
    assert not left, f"half-written files left: {left}"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code, err, needle):
    """Exit 2 and exactly one stderr line, a skipjack error naming the problem (no traceback)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1, err
    assert lines[0].startswith("skipjack: error:") and "internal error" not in lines[0], lines[0]
    assert needle.lower() in lines[0].lower(), (needle, lines[0])


# ---- 1. every CLI option with wrong types, out-of-range, empty, huge, non-finite and odd-encoding values ----

GENERATE = [
    (["-n", "abc"], "invalid int value"),
    (["-n", "1.5"], "invalid int value"),
    (["-n", ""], "invalid int value"),
    (["-n", "0"], "max new tokens"),
    (["-n", "-5"], "max new tokens"),
    (["-n", "1000000000"], "max new tokens"),
    (["-n", "9" * 30], "max new tokens"),
    (["-t", "-1"], "temperature"),
    (["-t", "nan"], "temperature"),
    (["-t", "inf"], "temperature"),
    (["-t", "-inf"], "temperature"),
    (["-t", "1e999"], "temperature"),
    (["-t", "abc"], "invalid float value"),
    (["-t", ""], "invalid float value"),
    (["--top-k", "-1"], "top-k"),
    (["--top-k", "2.5"], "invalid int value"),
    (["--top-k", "x"], "invalid int value"),
    (["--top-p", "0"], "top-p"),
    (["--top-p", "1.0001"], "top-p"),
    (["--top-p", "nan"], "top-p"),
    (["--top-p", "-0.5"], "top-p"),
    (["--top-p", "inf"], "top-p"),
    (["--min-p", "1"], "min-p"),
    (["--min-p", "-0.1"], "min-p"),
    (["--min-p", "inf"], "min-p"),
    (["--min-p", "nan"], "min-p"),
    (["--repetition-penalty", "0"], "repetition"),
    (["--repetition-penalty", "-2"], "repetition"),
    (["--repetition-penalty", "nan"], "repetition"),
    (["--repetition-penalty", "inf"], "repetition"),
    (["--repetition-penalty", "x"], "invalid float value"),
    (["--seed", "-1"], "seed"),
    (["--seed", str(2**64)], "seed"),
    (["--seed", "1.5"], "invalid int value"),
    (["--seed", "abc"], "invalid int value"),
    (["--dtype", "fp8"], "unknown dtype"),
    (["--dtype", ""], "unknown dtype"),
    (["--dtype", "Q4"], "unknown dtype"),
    (["--method", "magic"], "unknown method"),
    (["--method", ""], "--method is empty"),
    (["--method", SUR], "not valid utf-8"),
    (["--method", "pld:k=abc"], "k (fixed draft length"),
    (["--method", "pld:k=1.5"], "k (fixed draft length"),
    (["--method", "pld:k=65"], "must be in [0, 64]"),
    (["--method", "pld:k=-1"], "must be in [0, 64]"),
    (["--method", "pld:k"], "key=value"),
    (["--method", "plain:k=2"], "takes no options"),
    (["--method", "pld:bogus=1"], "unknown option"),
    (["--method", "ngram:width=0"], "width"),
    (["--method", "ngram:order=99"], "order"),
    (["--method", "ngram:explore=nan"], "explore"),
    (["--method", "ngram:rows=inf"], "rows"),
    (["--method", "ngram:width=abc"], "must be an integer"),
    (["--method", "kangaroo:threshold=2"], "threshold"),
    (["--method", "lookahead:ngram=1"], "ngram (n-gram size"),
    (["--method", "lookahead:window=16,ngram=8"], "must fit one verify pass"),
    (["--method", "mix:of=pld+magic"], "of= needs two or more"),
    (["--stop", ""], "--stop[0] is an empty string"),
    (["--stop", SUR], "not valid utf-8"),
    (["--model", ""], "--model is empty"),
    (["--model", "/nonexistent/m.gguf"], "not found"),
    (["--model", SUR], "not valid utf-8"),
    (["--prompt-cache", "/nonexistent/dir/p.cache"], "does not exist"),
    (["--bogus-flag"], "unrecognized arguments"),
]


@pytest.mark.parametrize(
    "prompt, needle",
    [("", "empty"), ("   \n\t", "empty"), (SUR, "not valid utf-8"), ("ok" + SUR[0], "not valid utf-8")],
    ids=["empty", "blank", "undecodable", "undecodable-tail"],
)
def test_generate_prompt(capsys, prompt, needle):
    one_line(*run(capsys, "generate", prompt)[::2], needle)


@pytest.mark.parametrize(
    "argv, needle",
    [([], "required"), (["-n"], "expected one argument"), (["--temperature"], "expected one argument")],
    ids=["no-prompt", "n-no-value", "t-no-value"],
)
def test_generate_missing_values(capsys, argv, needle):
    one_line(*run(capsys, "generate", *argv)[::2], needle)


def test_generate_paths_that_are_folders_or_foreign(capsys, tmp_path):
    one_line(*run(capsys, "generate", "--prompt-cache", tmp_path, "hi")[::2], "is a folder")
    one_line(*run(capsys, "generate", "--method", f"ngram:path={tmp_path}", "hi")[::2], "is a folder")
    junk = tmp_path / "junk.cache"
    junk.write_bytes(b"hello")
    one_line(*run(capsys, "generate", "--prompt-cache", junk, "hi")[::2], "not a skipjack prompt cache")
    assert junk.read_bytes() == b"hello"


CHAT = [
    (["--temperature", "nan"], "temperature"),
    (["--top-p", "2"], "top-p"),
    (["--method", "magic"], "unknown method"),
    (["--dtype", "int3"], "unknown dtype"),
    (["--stop", ""], "empty string"),
    (["--model", "/nonexistent"], "not found"),
    (["-n", "0"], "max new tokens"),
    (["--seed", "-3"], "seed"),
]


TRAIN = [
    (["--layers", "0"], "--layers"),
    (["--layers", "9"], "--layers"),
    (["--layers", "x"], "invalid int value"),
    (["--vocab", "-1"], "--vocab"),
    (["--prompts", "-1"], "--prompts"),
    (["--tokens", "10"], "--tokens"),
    (["--steps", "0"], "--steps"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--seed", "-1"], "--seed"),
    (["--out", ""], "--out is empty"),
]


def test_train_adapter_out_is_a_folder(capsys, tmp_path):
    one_line(*run(capsys, "train-adapter", "--out", tmp_path)[::2], "is a folder")


BENCH = [
    (["--repeats", "1"], "--repeats"),
    (["-n", "0"], "--max-new-tokens"),
    (["-t", "nan"], "--temperature"),
    (["--seed", "-1"], "--seed"),
    (["--suite", "nope"], "unknown suite"),
    (["--methods", "magic"], "unknown method"),
    (["--peers", "nope"], "unknown peer"),
    (["--prompts", "/nonexistent.jsonl"], "not a file"),
]

# (command, what comes before and after the case's arguments)
AROUND = {"generate": ([], ["hi"]), "chat": ([], []), "train-adapter": ([], []), "bench": (["--dtype", "fp32"], [])}
OPTIONS = [
    (cmd, argv, needle)
    for cmd, table in (("generate", GENERATE), ("chat", CHAT), ("train-adapter", TRAIN), ("bench", BENCH))
    for argv, needle in table
]


@pytest.mark.parametrize("cmd, argv, needle", OPTIONS, ids=[f"{c} {' '.join(a)}" for c, a, _ in OPTIONS])
def test_option(capsys, tmp_path, cmd, argv, needle):
    before, after = AROUND[cmd]
    out = ["--out", tmp_path / "out"] if cmd == "bench" else []
    one_line(*run(capsys, cmd, *before, *out, *argv, *after)[::2], needle)


def test_bench_out_and_prompts_files(capsys, tmp_path):
    one_line(*run(capsys, "bench")[::2], "required")
    f = tmp_path / "file"
    f.write_text("x")
    one_line(*run(capsys, "bench", "--dtype", "fp32", "--out", f)[::2], "not writable")
    bad = tmp_path / "p.jsonl"
    bad.write_bytes(b"\xff\xfe{")
    one_line(*run(capsys, "bench", "--dtype", "fp32", "--out", tmp_path / "o", "--prompts", bad)[::2], "cannot read")


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "required"),
        (["nope"], "invalid choice"),
        (["models", "--fetch"], "expected at least one"),
        (["models", "--fetch", "nope"], "unknown named model"),
    ],
    ids=["no-command", "unknown-command", "fetch-nothing", "fetch-unknown"],
)
def test_commands(capsys, argv, needle):
    one_line(*run(capsys, *argv)[::2], needle)


# ---- 2. environment variables ----

ENV = [
    ("SKIPJACK_THREADS", "abc", "SKIPJACK_THREADS"),
    ("SKIPJACK_THREADS", "0", "SKIPJACK_THREADS"),
    ("SKIPJACK_THREADS", "-1", "SKIPJACK_THREADS"),
    ("SKIPJACK_THREADS", "100000", "SKIPJACK_THREADS"),
    ("SKIPJACK_THREADS", "", "SKIPJACK_THREADS"),
    ("SKIPJACK_THREADS", "1.5", "SKIPJACK_THREADS"),
    ("SKIPJACK_HOME", "", "empty"),
    ("SKIPJACK_HOME", "   ", "empty"),
    ("SKIPJACK_LOCK_TIMEOUT", "abc", "SKIPJACK_LOCK_TIMEOUT"),
    ("SKIPJACK_LOCK_TIMEOUT", "-1", "SKIPJACK_LOCK_TIMEOUT"),
    ("SKIPJACK_LOCK_TIMEOUT", "nan", "SKIPJACK_LOCK_TIMEOUT"),
    ("SKIPJACK_LOCK_TIMEOUT", "1e9", "SKIPJACK_LOCK_TIMEOUT"),
]


@pytest.mark.parametrize("var, value, needle", ENV, ids=[f"{v}={x!r}" for v, x, _ in ENV])
def test_environment(capsys, monkeypatch, var, value, needle):
    monkeypatch.setenv(var, value)
    one_line(*run(capsys, "generate", "hi")[::2], needle)


def test_home_that_is_a_file_or_cannot_be_made(capsys, monkeypatch, tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    monkeypatch.setenv("SKIPJACK_HOME", str(f))
    one_line(*run(capsys, "generate", "hi")[::2], "is not a folder")
    monkeypatch.setenv("SKIPJACK_HOME", str(f / "below"))
    one_line(*run(capsys, "generate", "hi")[::2], "not a directory")
    monkeypatch.setenv("SKIPJACK_HOME", "/proc/skipjack-cannot-be-here")
    one_line(*run(capsys, "generate", "hi")[::2], "cannot create the cache folder")


def test_home_with_tilde_is_expanded(monkeypatch):
    monkeypatch.setenv("SKIPJACK_HOME", "~/sj-home")
    assert store.home() == Path.home() / "sj-home"


# ---- 3. the Python API: the same checks, as SkipjackError ----


@pytest.fixture(scope="module")
def engine(tiny_folder):
    from skipjack.engine import Engine

    return Engine.load(str(tiny_folder), "fp32", tune=False)


def _sp(**kw):
    from skipjack.decoding.sampling import SamplingParams

    return SamplingParams(**kw)


SAMPLING = [
    ({"temperature": "0.5"}, "temperature must be a number"),
    ({"temperature": math.nan}, "temperature must be a finite"),
    ({"temperature": -1.0}, "temperature must be in"),
    ({"temperature": True}, "temperature must be a number"),
    ({"top_k": 1.5}, "top-k must be an integer"),
    ({"top_k": True}, "top-k must be an integer"),
    ({"top_k": -1}, "top-k must be in"),
    ({"top_p": 0}, "top-p must be in"),
    ({"top_p": 2}, "top-p must be in"),
    ({"top_p": None}, "top-p must be a number"),
    ({"min_p": 1}, "min-p must be in"),
    ({"min_p": math.inf}, "min-p must be a finite"),
    ({"repetition_penalty": 0}, "repetition penalty must be in"),
    ({"repetition_penalty": math.inf}, "repetition penalty must be a finite"),
    ({"seed": -1}, "seed must be in"),
    ({"seed": "1"}, "seed must be an integer"),
    ({"seed": 2**64}, "seed must be in"),
    ({"max_new_tokens": 0}, "max new tokens must be in"),
    ({"max_new_tokens": 1.0}, "max new tokens must be an integer"),
    ({"max_new_tokens": 2**40}, "max new tokens must be in"),
    ({"stop_token_ids": [-1]}, "stop token id"),
    ({"stop_token_ids": "ab"}, "stop token ids must be"),
]


@pytest.mark.parametrize("kw, needle", SAMPLING, ids=[f"{k}={v!r}" for d, _ in SAMPLING for k, v in d.items()])
def test_api_sampling_params(kw, needle):
    with pytest.raises(SkipjackError, match=None) as e:
        _sp(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


REQUESTS = [
    ({"prompt": "text"}, "prompt must be a non-empty list"),
    ({"prompt": []}, "prompt must be a non-empty list"),
    ({"prompt": [-1]}, "prompt[0] must be a token id"),
    ({"prompt": [10**9]}, "prompt[0] must be a token id"),
    ({"prompt": [1, 1.5]}, "prompt[1] must be a token id"),
    ({"prompt": [True]}, "prompt[0] must be a token id"),
    ({"prompt": None}, "prompt must be a non-empty list"),
    ({"params": {"temperature": 0}}, "params must be SamplingParams"),
    ({"params": None}, "params must be SamplingParams"),
    ({"stop": 5}, "stop must be a string or a list"),
    ({"stop": [""]}, "stop[0] is an empty string"),
    ({"stop": [SUR]}, "not valid UTF-8"),
    ({"stop": [1]}, "stop[0] must be a string"),
    ({"session": "x"}, "session must be a skipjack Session"),
    ({"method": 5}, "method must be a method spec"),
    ({"method": "magic"}, "unknown method"),
    ({"method": ""}, "method is empty"),
    ({"method": "pld:k=99"}, "must be in [0, 64]"),
]


@pytest.mark.parametrize("kw, needle", REQUESTS, ids=[f"{k}={v!r}" for d, _ in REQUESTS for k, v in d.items()])
def test_api_request(engine, kw, needle):
    from skipjack.engine import Request

    req = Request(**({"prompt": [1, 2, 3]} | kw))
    with pytest.raises(SkipjackError) as e:
        engine.complete(req)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_api_request_changed_after_it_was_made(engine):
    from skipjack.engine import Request

    req = Request([1, 2, 3], _sp())
    req.params.temperature = float("nan")
    with pytest.raises(SkipjackError, match="temperature must be a finite"):
        engine.complete(req)
    with pytest.raises(SkipjackError, match="a request must be a skipjack Request"):
        engine.complete("hello")


MESSAGES = [
    ([{"role": "robot", "content": "x"}], "role must be one of"),
    ([{"content": "x"}], "must be an object with a role"),
    ([], "non-empty list"),
    (["hi"], "must be an object"),
    ([{"role": "user", "content": 5}], "content must be a string"),
    ([{"role": "user", "content": SUR}], "not valid UTF-8"),
    ([{"role": "user", "content": "  "}], "the prompt is empty"),
    (
        [{"role": "user", "content": "x"}] + [{"role": "assistant", "content": c} for c in "ab"],
        "2 or more assistant messages at the end",
    ),
    (SUR, "not valid UTF-8"),
    ("", "the prompt is empty"),
]


@pytest.mark.parametrize("prompt, needle", MESSAGES, ids=[repr(p)[:30] for p, _ in MESSAGES])
def test_api_prompt_text_and_messages(engine, prompt, needle):
    with pytest.raises(SkipjackError) as e:
        engine.tokenizer.prompt_ids(prompt)
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"spec": 5}, "--model must be a string"),
        ({"dtype": "fp8"}, "unknown dtype"),
        ({"dtype": 5}, "unknown dtype"),
        ({"spec": "/nonexistent/x"}, "not found"),
    ],
    ids=["spec-int", "dtype-fp8", "dtype-int", "spec-missing"],
)
def test_api_engine_load(kw, needle):
    from skipjack.engine import Engine

    with pytest.raises(SkipjackError) as e:
        Engine.load(**kw)
    assert needle in str(e.value)


# ---- 4. numerics at the edges: never inf/NaN probabilities, never a NaN token ----


@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 5e-324, 1e300])
def test_sampling_at_extreme_temperatures(temperature):
    from skipjack.decoding.sampling import probs

    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0 - 1e-6]])
    pr = probs(logits, _sp(temperature=temperature))
    assert torch.isfinite(pr).all() and abs(float(pr.sum()) - 1) < 1e-5
    if temperature < 1e-30:
        assert int(pr.argmax()) == 1 and float(pr[0, 1]) == 1.0  # tends to greedy's argmax


@pytest.mark.parametrize("top_p", [5e-324, 1e-308, 1e-45, 1e-8])
def test_sampling_at_tiny_top_p(top_p):
    """A top_p that rounds to 0 in fp32 still keeps the top token (it once dropped every token: NaN)."""
    from skipjack.decoding.sampling import probs

    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    pr = probs(logits, _sp(temperature=0.7, top_p=top_p))
    assert torch.isfinite(pr).all() and pr[0].tolist() == [0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("penalty", [1e-38, 1e30, 3.4e38])
def test_extreme_repetition_penalty(penalty):
    from skipjack.decoding.sampling import Sampler

    s = Sampler(_sp(temperature=0.7, repetition_penalty=penalty, seed=1), [0, 1], 4)
    for _ in range(5):
        assert 0 <= s.pick(torch.tensor([3.0e38, -3.0e38, 1.0, -1.0])) < 4


def test_non_finite_logits_never_become_a_token(tiny_llama64):
    from skipjack.decoding.sampling import SamplingParams
    from skipjack.decoding.sequence import generate

    with torch.no_grad():
        tiny_llama64.norm_weight[0] = float("nan")
    try:
        with pytest.raises(Fault, match="non-finite logits"):  # a fault, not bad input (tests/test_faults.py)
            list(generate(tiny_llama64, [1, 2, 3], SamplingParams(max_new_tokens=4)))
    finally:
        with torch.no_grad():
            tiny_llama64.norm_weight[0] = 1.0


def test_cli_tiny_temperature_and_huge_penalty(capsys, tiny_folder):
    code, out, err = run(capsys, "generate", "--model", tiny_folder, "--no-tune", "-n", "6", "-t", "1e-40", "hi")
    assert code == 0, err
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        tiny_folder,
        "--no-tune",
        "-n",
        "6",
        "-t",
        "0.7",
        "--repetition-penalty",
        "1e30",
        "hi",
    )
    assert code == 0, err


# ---- 5. files of every kind the project reads: corrupt, truncated, foreign, hand-edited ----


def _gguf(tmp_path, name="t.gguf", **kw) -> Path:
    path = tmp_path / name
    write_tiny_gguf(path, lambda i, n, a: "F32" if a.ndim == 1 else "Q8_0", **kw)
    return path


def _gen(capsys, model, *extra):
    return run(capsys, "generate", "--model", model, "--dtype", "fp32", "--no-tune", "-n", "4", "--json", *extra, "hi")


@pytest.mark.parametrize(
    "kind, needle",
    [
        ("junk", "not a gguf"),
        ("header-only", "gguf"),
        ("truncated-data", "gguf"),
        ("qwen3", "architecture"),
        ("mamba", "architecture"),
        ("missing-tensor", "blk.1.ffn_down.weight"),
        ("missing-embedding", "token_embd"),
    ],
)
def test_bad_gguf_is_refused_before_any_conversion(capsys, tmp_path, home, kind, needle):
    if kind == "junk":
        path = tmp_path / "j.gguf"
        path.write_bytes(b"not a model" * 50)
    elif kind == "header-only":
        path = tmp_path / "h.gguf"
        path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    elif kind == "truncated-data":
        path = _gguf(tmp_path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 5000])
    elif kind in ("qwen3", "mamba"):
        path = _gguf(tmp_path, arch=kind)
    elif kind == "missing-tensor":
        path = _gguf(tmp_path, drop=("blk.1.ffn_down.weight",))
    else:
        path = _gguf(tmp_path, drop=("token_embd.weight",))
    one_line(*_gen(capsys, path)[::2], needle)
    assert not list(home.glob("converted/*")), "nothing converted or cached for a refused file"


@pytest.mark.parametrize(
    "kind",
    ["no-config", "config-junk", "config-unknown", "no-weights", "weights-junk", "weights-truncated", "no-tokenizer"],
)
def test_bad_hf_folder(capsys, tmp_path, tiny_folder, kind):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_folder, folder)
    weights = folder / "model.safetensors"
    needle = {
        "no-config": "no config.json",
        "config-junk": "not valid json",
        "config-unknown": "unknown architecture",
        "no-weights": "no *.safetensors",
        "weights-junk": "cannot read weights",
        "weights-truncated": "cannot read weights",
        "no-tokenizer": "tokenizer",
    }[kind]
    if kind == "no-config":
        (folder / "config.json").unlink()
    elif kind == "config-junk":
        (folder / "config.json").write_text("{nope")
    elif kind == "config-unknown":
        (folder / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    elif kind == "no-weights":
        weights.unlink()
    elif kind == "weights-junk":
        weights.write_bytes(b"\x00" * 100)
    elif kind == "weights-truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        for f in folder.glob("tokenizer*"):
            f.unlink()
        (folder / "special_tokens_map.json").unlink(missing_ok=True)
    one_line(*_gen(capsys, folder)[::2], needle)


def _entry(home) -> Path:
    (entry,) = [p for p in (home / "converted").iterdir() if ".tmp-" not in p.name]
    return entry


@pytest.mark.parametrize("damage", ["same-size", "truncated", "no-metadata", "metadata-junk", "file-missing"])
def test_damaged_cache_entry_is_rebuilt_once(capsys, tmp_path, home, damage):
    path = _gguf(tmp_path)
    code, out, err = _gen(capsys, path)
    assert code == 0, err
    good = json.loads(out)["tokens"]
    entry = _entry(home)
    weights = entry / "model.safetensors"
    if damage == "same-size":
        data = bytearray(weights.read_bytes())
        data[-4000:-3996] = b"\xff\xff\xff\x7f"  # a NaN in the last tensors, same size
        weights.write_bytes(bytes(data))
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif damage == "no-metadata":
        (entry / "skipjack.json").unlink()
    elif damage == "metadata-junk":
        (entry / "skipjack.json").write_text("{")
    else:
        (entry / "config.json").unlink()
    code, out, err = _gen(capsys, path)
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "is damaged" in lines[0] and "rebuilding it" in lines[0], err
    assert json.loads(out)["tokens"] == good
    code, out, err = _gen(capsys, path)  # rebuilt and whole: no second notice
    assert code == 0 and "damaged" not in err and json.loads(out)["tokens"] == good


def test_sealed_entry_is_not_hashed_while_its_stamp_holds(tmp_path, monkeypatch):
    folder = tmp_path / "e"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"abc" * 100)
    integrity.seal(folder, "meta.json", {"x": 1})
    calls = []
    real = integrity.file_hash
    monkeypatch.setattr(integrity, "file_hash", lambda p: calls.append(p) or real(p))
    assert integrity.check(folder, "meta.json") is None and not calls
    time.sleep(0.01)
    (folder / "a.bin").write_bytes(b"abd" * 100)  # same size, new content: the stamp no longer matches
    assert "checksum" in integrity.check(folder, "meta.json") and calls


@pytest.mark.parametrize("damage", ["size", "content", "ok"])
def test_fetched_model_file_check(tmp_path, damage):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + b"x" * 1000)
    integrity.seal_file(f)
    if damage == "size":
        f.write_bytes(b"GGUF")
    elif damage == "content":
        time.sleep(0.01)
        f.write_bytes(b"GGUF" + b"y" * 1000)
    why = integrity.check_file(f)
    assert (why is None) == (damage == "ok")


def _prompt_cache(tmp_path, capsys, tiny_folder) -> Path:
    path = tmp_path / "p.cache"
    code, _, err = run(capsys, "generate", "--model", tiny_folder, "--no-tune", "-n", "3", "--prompt-cache", path, "hi")
    assert code == 0, err
    return path


@pytest.mark.parametrize("edit", ["tokens", "tensor", "truncated", "capacity"])
def test_damaged_prompt_cache(capsys, tmp_path, tiny_folder, edit):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = _prompt_cache(tmp_path, capsys, tiny_folder)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if edit == "tokens":
        save_file(tensors, str(path), metadata=meta | {"tokens": json.dumps([10**9])})
    elif edit == "tensor":
        tensors["0.k"] = tensors["0.k"] + 1
        save_file(tensors, str(path), metadata=meta)
    elif edit == "truncated":
        path.write_bytes(path.read_bytes()[:-64])
    else:
        save_file(tensors, str(path), metadata=meta | {"capacity": "x"})
    before = path.read_bytes()
    code, _, err = run(capsys, "generate", "--model", tiny_folder, "--no-tune", "-n", "3", "--prompt-cache", path, "hi")
    needle = "not a skipjack prompt cache" if edit == "truncated" else "is damaged"
    one_line(code, err, needle)
    assert path.read_bytes() == before, "a damaged cache is left as it was"


def test_prompt_cache_of_an_older_format_is_replaced(capsys, tmp_path, tiny_folder):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = _prompt_cache(tmp_path, capsys, tiny_folder)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata=meta | {"version": "1"})
    code, _, err = run(capsys, "generate", "--model", tiny_folder, "--no-tune", "-n", "3", "--prompt-cache", path, "hi")
    assert code == 0 and "older format" in err


NGRAM_FILES = [
    ("{not json", "is damaged"),
    ("[]", "not a skipjack n-gram table"),
    (json.dumps({"format": 2, "rows": []}), "not a skipjack n-gram table"),
    (json.dumps({"format": 1, "rows": 5}), "not a skipjack n-gram table"),
    (json.dumps({"format": 1, "rows": [[[-1], {"2": 1.0}]]}), "row 0: token ids"),
    (json.dumps({"format": 1, "rows": [[[1], {"x": 1.0}]]}), "is damaged"),
    (json.dumps({"format": 1, "rows": [[[1], {str(2**40): 1.0}]]}), "row 0: token ids"),
    ('{"format": 1, "rows": [[[1], {"2": NaN}]]}', "row 0: counts"),
    (json.dumps({"format": 1, "rows": [[[1], {"2": -1}]]}), "row 0: counts"),
    (json.dumps({"format": 1, "rows": [[[1], {"2": "1"}]]}), "row 0: counts"),
    (json.dumps({"format": 1, "rows": [[[], {"2": 1}]]}), "row 0: token ids"),
    (json.dumps({"format": 1, "rows": [[[1] * 6, {"2": 1}]]}), "row 0: token ids"),
    (json.dumps({"format": 1, "rows": [[[1], {"2": 1}], "x"]}), "is damaged"),
    (json.dumps({"format": 1, "rows": [[[True], {"2": 1}]]}), "row 0: token ids"),
]


@pytest.mark.parametrize("text, needle", NGRAM_FILES, ids=[t[:40] for t, _ in NGRAM_FILES])
def test_hand_edited_ngram_table(tmp_path, text, needle):
    from skipjack.drafters.base import Resources
    from skipjack.drafters.ngram import NGramDrafter

    path = tmp_path / "table.json"
    path.write_text(text)
    d = NGramDrafter(path=str(path))
    with pytest.raises(SkipjackError) as e:
        d.prepare(Resources())  # the table is read once, before any request
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert path.read_text() == text, "a damaged table is never saved back over"


def test_ngram_path_with_tilde_is_expanded(capsys, tmp_path, monkeypatch, tiny_folder):
    """The README's `ngram:path=~/...`: no literal `~` folder in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    (tmp_path / "h").mkdir()
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _, err = run(
        capsys,
        "generate",
        "--model",
        tiny_folder,
        "--no-tune",
        "-n",
        "4",
        "--method",
        "ngram:path=~/tables/ngram.json",
        "hi",
    )
    assert code == 0, err
    assert not list(work.iterdir()) and (tmp_path / "h" / "tables" / "ngram.json").is_file()


@pytest.mark.parametrize("damage", ["junk", "foreign", "edited", "shape"])
def test_damaged_adapter(tmp_path, damage):
    from conftest import hf_model, ours_from_hf
    from safetensors import safe_open
    from safetensors.torch import save_file

    from skipjack.drafters import kangaroo

    tiny_llama64 = ours_from_hf(hf_model("llama", seed=1, vocab=48, num_hidden_layers=4))
    path = tmp_path / "a.safetensors"
    adapter = kangaroo.Adapter.for_model(tiny_llama64, 1)
    kangaroo.save(adapter, tiny_llama64, path, {})
    kangaroo.load(tiny_llama64, path)  # whole: loads
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if damage == "junk":
        path.write_bytes(b"\x00" * 64)
    elif damage == "foreign":
        save_file({"x": torch.zeros(2)}, str(path))
    elif damage == "edited":
        name = next(iter(tensors))
        tensors[name] = tensors[name] + 0.5
        save_file(tensors, str(path), metadata=meta)
    else:
        save_file(tensors, str(path), metadata=meta | {"shape": json.dumps({"hidden": "x"})})
    with pytest.raises(SkipjackError) as e:
        kangaroo.load(tiny_llama64, path)
    assert "train-adapter" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["{", "[]", json.dumps({"99999999": 5}), json.dumps({"1": -3}), json.dumps({"a": 1})])
def test_vocab_count_cache_out_of_range_is_recounted(monkeypatch, text):
    from skipjack import vocab

    class Tok:
        hf = type("H", (), {"get_vocab": lambda self: {"a": 0, "b": 1}, "__len__": lambda self: 2})()

        def encode(self, text, add_special_tokens=False):
            return [0, 1, 1]

    monkeypatch.setattr(vocab, "local_text", lambda: "abc")
    tok = Tok()
    path = store.cache_file(
        "vocab",
        {
            "tokenizer": __import__("hashlib")
            .sha256(json.dumps(sorted(tok.hf.get_vocab().items())).encode())
            .hexdigest(),
            "v": vocab.VERSION,
        },
    )
    path.parent.mkdir(parents=True)
    path.write_text(text)
    assert vocab.token_counts(tok) == {0: 1, 1: 2}


# ---- 6. faults: locks, kill -9, concurrent writers, broken pipes, full or read-only disks ----


def test_held_lock_is_a_bounded_wait(tmp_path, monkeypatch):
    from skipjack.drafters.ngram_table import NGramTable

    monkeypatch.setenv("SKIPJACK_LOCK_TIMEOUT", "0.3")
    path = tmp_path / "t.json"
    t = NGramTable()
    t.add([1, 2, 3, 4], 0, 1.0)
    t.save(path)
    before = path.read_text()
    with open(str(path) + ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        t0 = time.monotonic()
        with pytest.raises(SkipjackError, match="is locked by another process"):
            t.save(path)
        assert time.monotonic() - t0 < 5
    assert path.read_text() == before


def test_held_lock_keeps_the_finished_result(capsys, tmp_path, monkeypatch, tiny_folder):
    """The table cannot be saved (its lock is held elsewhere): the JSON result is still printed, then exit 2."""
    monkeypatch.setenv("SKIPJACK_LOCK_TIMEOUT", "0.2")
    path = tmp_path / "t.json"
    with open(str(path) + ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        code, out, err = _gen(capsys, tiny_folder, "--method", f"ngram:path={path}")
    one_line(code, err, "is locked")
    assert json.loads(out)["new_tokens"] == 4


def test_kill_9_mid_conversion_leaves_nothing_behind(capsys, tmp_path, home):
    """A conversion killed half way leaves a temporary folder; the next run removes it and converts whole."""
    path = _gguf(tmp_path)
    script = textwrap.dedent(f"""
        import time, safetensors.torch as st
        from pathlib import Path
        from skipjack.loading import load as loading
        real = st.save_file
        def slow(t, f, *a, **k):
            real(t, f, *a, **k)
            Path(f).write_bytes(Path(f).read_bytes()[:100])  # half-written
            print("writing", flush=True)
            time.sleep(60)
        st.save_file = slow
        loading.convert_gguf(Path({str(path)!r}))
    """)
    env = os.environ | {"SKIPJACK_HOME": str(home)}
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True)
    assert p.stdout.readline().strip() == "writing"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert [q for q in (home / "converted").iterdir() if ".tmp-" in q.name], "the killed run's folder is there"
    code, out, err = _gen(capsys, path)
    assert code == 0, err
    assert [q.name for q in (home / "converted").iterdir()] == [_entry(home).name]


def test_concurrent_ngram_writers_keep_every_row(tmp_path):
    path = tmp_path / "t.json"
    script = textwrap.dedent("""
        import sys
        from skipjack.drafters.ngram_table import NGramTable
        t = NGramTable()
        base = int(sys.argv[2])
        for i in range(20):
            t.add([base, base + 1 + i], 0, 1.0)
            t.save(sys.argv[1])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), str(b)]) for b in (1000, 2000, 3000)]
    assert all(p.wait() == 0 for p in procs)
    from skipjack.drafters.ngram_table import NGramTable

    t = NGramTable()
    t.load(path)
    assert all(t.lookup(b) for b in (1000, 2000, 3000))


def test_broken_pipe_is_one_line(capsys, monkeypatch, tiny_folder):
    class Closed:
        def write(self, s):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return sys.__stdout__.fileno()

    saved = os.dup(1)
    monkeypatch.setattr(sys, "stdout", Closed())
    try:
        code = main(["generate", "--model", str(tiny_folder), "--no-tune", "-n", "8", "hi"])
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    _, err = capsys.readouterr()
    one_line(code, err, "broken pipe")


def test_broken_pipe_in_a_real_pipeline(tmp_path, tiny_folder):
    cmd = (
        f"{sys.executable} -m skipjack.cli generate --model {tiny_folder} --no-tune -n 80 -t 1 --seed 1 "
        "'write a long story' | head -c 1 >/dev/null; exit ${PIPESTATUS[0]}"
    )
    env = os.environ | {"SKIPJACK_HOME": str(tmp_path / "home")}
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env)
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert r.returncode in (0, 2), r.stderr  # 0 when the tiny model's output fit the pipe before head exited
    if r.returncode == 2:
        assert [ln for ln in r.stderr.splitlines() if ln.strip()][-1].endswith("(broken pipe)")


def test_disk_full_during_conversion(capsys, tmp_path, home, monkeypatch):
    import safetensors.torch as st

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "save_file", full)
    one_line(*_gen(capsys, _gguf(tmp_path))[::2], "no space left on the device")
    assert not list((home / "converted").iterdir())


@pytest.fixture
def small_mount(tmp_path):
    """A 256 KB tmpfs (root only, where mounting is allowed); skipped with the reason elsewhere."""
    where = tmp_path / "mnt"
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({r.stderr.strip() or 'not root'}): the simulated full disk above "
            "covers the same code"
        )
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_disk_full_on_a_real_small_filesystem(capsys, tmp_path, small_mount, monkeypatch):
    monkeypatch.setenv("SKIPJACK_HOME", str(small_mount / "home"))
    path = _gguf(tmp_path)  # its fp32 conversion (~600 KB) does not fit in 256 KB
    one_line(*_gen(capsys, path)[::2], "no space left")
    assert not [p for p in (small_mount / "home" / "converted").iterdir()]


def test_read_only_filesystem(capsys, tmp_path, small_mount, monkeypatch, tiny_folder):
    (small_mount / "home").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_mount)], check=True)
    monkeypatch.setenv("SKIPJACK_HOME", str(small_mount / "home"))
    one_line(*run(capsys, "generate", "--model", tiny_folder, "hi")[::2], "not writable")
    monkeypatch.setenv("SKIPJACK_HOME", str(tmp_path / "home"))
    one_line(*run(capsys, "generate", "--method", f"ngram:path={small_mount}/t.json", "hi")[::2], "not writable")
    one_line(*run(capsys, "generate", "--prompt-cache", small_mount / "p.cache", "hi")[::2], "not writable")


def test_chat_survives_bad_lines(capsys, monkeypatch, tiny_folder):
    """An undecodable line, an internal failure in one turn: each turn is dropped and the chat goes on."""
    from skipjack.engine import Engine

    lines = iter([SUR, "boom", "hello", "hello again", "/exit"])

    def fake_input(prompt=""):
        line = next(lines)
        if line == "boom":
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return line

    monkeypatch.setattr("builtins.input", fake_input)
    real = Engine.complete
    calls = []

    def complete(self, req, on_text=None):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in one turn")
        return real(self, req, on_text)

    monkeypatch.setattr(Engine, "complete", complete)
    code, out, err = run(capsys, "chat", "--model", tiny_folder, "--no-tune", "-n", "3")
    assert code == 0, err
    assert "not valid UTF-8" in err and "a bug in one turn" in err and "[3 tokens" in err
