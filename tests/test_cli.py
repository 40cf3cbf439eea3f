"""CLI behaviour, and bad input: one line on stderr, exit status != 0, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from skipjack.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, needle):
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and needle in lines[0].lower(), lines[0]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--model", "/nonexistent/model.gguf", "hi"], "not found"),
        (["--temperature", "-1", "hi"], "temperature"),
        (["--top-p", "1.5", "hi"], "top-p"),
        (["--top-p", "0", "hi"], "top-p"),
        (["--top-k", "-2", "hi"], "top-k"),
        (["--min-p", "1", "hi"], "min-p"),
        (["--repetition-penalty", "0", "hi"], "repetition"),
        (["--max-new-tokens", "0", "hi"], "max new tokens"),
        (["   "], "empty"),
        (["--method", "magic", "hi"], "unknown method"),
        (["--method", "pld:k=999", "hi"], "must be in [0, 64] (got 999)"),
        (["--method", "ngram:width=0", "hi"], "width"),
        (["--method", "pld:bogus=1", "hi"], "unknown option"),
        (["--dtype", "fp8", "hi"], "dtype"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, needle):
    code, _, err = run_cli(capsys, "generate", *argv)
    assert_one_line_error(code, err, needle)


def test_corrupt_and_truncated_model_files(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPJACK_HOME", str(tmp_path / "home"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all" * 10)
    code, _, err = run_cli(capsys, "generate", "--model", str(junk), "hi")
    assert_one_line_error(code, err, "not a gguf")
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    code, _, err = run_cli(capsys, "generate", "--model", str(trunc), "hi")
    assert_one_line_error(code, err, "gguf")
    assert not list((tmp_path / "home").glob("converted/*")), "no half-written cache entry"


def test_unknown_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    code, _, err = run_cli(capsys, "generate", "--model", str(tmp_path), "hi")
    assert_one_line_error(code, err, "unknown architecture")


def test_prompt_longer_than_context(capsys, tiny_folder):
    long_prompt = "the quick brown fox " * 200
    code, _, err = run_cli(capsys, "generate", "--model", str(tiny_folder), "--raw", long_prompt)
    assert_one_line_error(code, err, "context")


def test_generate_json_fields(capsys, tiny_folder):
    code, out, err = run_cli(
        capsys, "generate", "--model", str(tiny_folder), "-n", "12", "--json", "--method", "pld", "hello world"
    )
    assert code == 0, err
    res = json.loads(out)
    for key in ("text", "tokens", "new_tokens", "seconds", "tokens_per_s", "tokens_per_pass", "draft_steps", "method"):
        assert key in res
    assert res["new_tokens"] == len(res["tokens"]) <= 12 and res["method"] == "pld"


def test_streamed_text_equals_json_text(capsys, tiny_folder):
    argv = ["generate", "--model", str(tiny_folder), "-n", "20", "--method", "pld:k=4", "hello world"]
    code, streamed, _ = run_cli(capsys, *argv)
    assert code == 0
    code, out, _ = run_cli(capsys, *argv, "--json")
    assert streamed.rstrip("\n") == json.loads(out)["text"]


def test_chat_keeps_the_conversation_cached(capsys, monkeypatch, tiny_folder):
    """Three turns and a /reset: after the first turn, each prompt's history comes from the cache; after the
    reset, nothing does."""
    import io
    import re

    lines = "hello world\nthe quick brown fox\n/reset\nstop here please\n/exit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code, out, err = run_cli(capsys, "chat", "--model", str(tiny_folder), "-n", "6", "--method", "pld")
    assert code == 0, err
    stats = [tuple(map(int, m)) for m in re.findall(r"(\d+) of (\d+) prompt tokens cached", err)]
    assert len(stats) == 3, err
    (c1, p1), (c2, p2), (c3, p3) = stats
    assert c1 == 0 and 0 < c2 < p2 and c2 >= p1 and c3 == 0


def test_chat_survives_a_turn_too_long_for_the_context(capsys, monkeypatch, tiny_folder):
    import io

    lines = "hello " * 200 + "\nhello world\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code, out, err = run_cli(capsys, "chat", "--model", str(tiny_folder), "-n", "4")
    assert code == 0, err
    errors = [ln for ln in err.splitlines() if "error" in ln]
    assert len(errors) == 1 and "context" in errors[0] and "Traceback" not in err
    assert err.count("prompt tokens cached") == 1  # the next turn ran, without the dropped one in its history


def test_models_lists_named_models(capsys):
    code, out, _ = run_cli(capsys, "models")
    assert code == 0 and "smollm2-135m" in out and "gemma3-270m" in out


def test_subprocess_error_has_no_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "skipjack.cli", "generate", "--model", str(tmp_path / "nope.gguf"), "hi"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_speculation_in_bf16_is_labelled_as_not_identical(capsys, tiny_folder):
    """In bf16 the kernels' rounding depends on how many tokens a pass carries, so pld's tokens may differ from
    plain's: the CLI says so (one note), and --json carries identical_to_plain; in fp32 neither appears."""
    from skipjack.methods import MethodSpec

    base = ["generate", "--model", str(tiny_folder), "-n", "4", "--json", "hello world"]
    code, out, err = run_cli(capsys, *base, "--method", "pld", "--dtype", "bf16")
    assert code == 0 and json.loads(out)["identical_to_plain"] is False
    assert err.count("note: in bf16, pld's output can differ from plain decoding's") == 1
    code, out, err = run_cli(capsys, *base, "--method", "pld")
    assert code == 0 and json.loads(out)["identical_to_plain"] is True and "note:" not in err
    code, out, err = run_cli(capsys, *base, "--dtype", "bf16")
    assert code == 0 and json.loads(out)["identical_to_plain"] is True and "note:" not in err  # plain is plain
    assert MethodSpec.parse("ngram:width=2").identical_to_plain("fp64")
    assert not MethodSpec.parse("ngram").identical_to_plain("bf16")
    code, _, err = run_cli(capsys, *base, "--method", "pld", "--dtype", "int3")
    assert_one_line_error(code, err, "unknown dtype")
