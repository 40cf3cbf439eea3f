"""Bad files as a new user would feed them, and the three kinds of error (`skipjack.errors`): bad input and an
unavailable resource are one line with exit 2 (HTTP 400 / 503), a fault such as a NaN from the model is one
`internal error` line with exit 1 (HTTP 500). Never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch

from skipjack import errors
from skipjack.cli import main
from skipjack.errors import Fault, SkipjackError, Unavailable


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIPJACK_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SKIPJACK_DEBUG", raising=False)
    return tmp_path / "home"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def gen(capsys, model, *extra):
    return run(capsys, "generate", "--model", model, "--dtype", "fp32", "--no-tune", "-n", "4", "--json", *extra, "hi")


def one_line(code: int, err: str, needle: str, status: int = 2, prefix: str = "skipjack: error:") -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == status, (code, err)
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert needle.lower() in lines[0].lower(), (needle, lines[0])
    assert "Traceback" not in err


def copy_of(folder: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "m"
    shutil.copytree(folder, dst)
    return dst


# ---- bad files: one line, exit 2 ----


def test_ngram_table_whose_counts_are_all_zero(capsys, tmp_path, tiny_folder):
    """Once a ZeroDivisionError in the drafter ("internal error"): now refused at the boundary, left untouched."""
    table = tmp_path / "t.json"
    text = json.dumps({"format": 1, "rows": [[[5], {"6": 0, "7": 0.0}], [[6], {"7": 1.0}]]})
    table.write_text(text)
    one_line(*gen(capsys, tiny_folder, "--method", f"ngram:path={table}")[::2], "row 0: every count is zero")
    assert table.read_text() == text


@pytest.mark.parametrize(
    "config, needle",
    [
        ("[1, 2]", "expected a JSON object (got a list)"),
        ('"llama"', "expected a JSON object (got a string)"),
        ("null", "expected a JSON object (got null)"),
        (None, "rope_scaling: expected a JSON object"),
        ("{", "not valid JSON"),
    ],
)
def test_config_json_of_the_wrong_shape(capsys, tmp_path, tiny_folder, config, needle):
    """Once an AttributeError ("internal error") for a list; every shape problem is one line naming the file."""
    folder = copy_of(tiny_folder, tmp_path)
    cfg = folder / "config.json"
    if config is None:
        config = json.dumps(json.loads(cfg.read_text()) | {"rope_scaling": "linear"})
    cfg.write_text(config)
    code, _, err = gen(capsys, folder)
    one_line(code, err, needle)
    assert str(cfg) in err


@pytest.mark.parametrize("text", ["", "{", "[]", '{"pads": [], "ms": 1, "plain_ms": {}}', "\x00\x01garbage"])
def test_damaged_tuning_caches_are_measured_again(tiny_llama64, home, text):
    """A truncated or garbage cache of the verify-cost prior or of the row padding: measured again and rewritten
    (a cache only costs time), never a traceback."""
    from skipjack.decoding import tuning

    prior = tuning.prior_path(tiny_llama64, {})
    prior.parent.mkdir(parents=True, exist_ok=True)
    prior.write_text(text)
    cm = tuning.cost_prior(tiny_llama64, {})
    assert cm.widths[0] == 1 and json.loads(prior.read_text())["widths"] == list(cm.widths)
    rows = home / "rows" / "x.json"
    rows.parent.mkdir(parents=True, exist_ok=True)
    rows.write_text(text)
    assert tuning._read_rows(rows, {(4, 4): []}) is None


def test_damaged_token_counts_are_counted_again(home):
    from skipjack import vocab

    class Tok:
        hf = type("HF", (), {"get_vocab": lambda self: {"a": 0, "b": 1}, "__len__": lambda self: 2})()

        def encode(self, text, add_special_tokens=False):
            return [0, 1, 1]

    first = vocab.token_counts(Tok())
    (path,) = (home / "vocab").iterdir()
    for bad in ("[1]", '{"0": -1}', '{"5": 1}', "{"):
        path.write_text(bad)
        assert vocab.token_counts(Tok()) == first
        assert json.loads(path.read_text()) == {str(k): v for k, v in first.items()}


def test_prompt_cache_with_damaged_metadata(capsys, tmp_path, tiny_folder):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "p.cache"
    assert gen(capsys, tiny_folder, "--prompt-cache", path)[0] == 0
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata=meta | {"tokens": "[1, "})
    one_line(*gen(capsys, tiny_folder, "--prompt-cache", path)[::2], "is damaged (its metadata: tokens")


# ---- the kinds: a fault is exit 1 and HTTP 500, a resource 503 ----


def nan_folder(tiny_folder: Path, tmp_path: Path) -> Path:
    """The tiny model with a NaN in its final norm: every logit it gives is NaN."""
    from safetensors.torch import load_file, save_file

    folder = copy_of(tiny_folder, tmp_path)
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    state["model.norm.weight"] = torch.full_like(state["model.norm.weight"], float("nan"))
    save_file(state, str(weights), metadata={"format": "pt"})
    return folder


def test_a_nan_from_the_model_is_a_fault_exit_1(capsys, tmp_path, tiny_folder):
    code, out, err = gen(capsys, nan_folder(tiny_folder, tmp_path))
    one_line(code, err, "non-finite logits", status=1, prefix="skipjack: internal error:")
    assert not out


def test_a_nan_from_the_model_is_http_500(tmp_path, tiny_folder):
    from test_server import running

    from skipjack.engine import Engine
    from skipjack.server.app import Settings, create_app

    engine = Engine.load(str(nan_folder(tiny_folder, tmp_path)), "fp32", tune=False)
    with running(create_app(Settings(), engine)) as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=60)
        stream = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 4, "stream": True}, timeout=60)
    assert r.status_code == 500, r.text
    e = r.json()["error"]
    assert e["type"] == "server_error" and e["message"].startswith("internal error: the model produced non-finite")
    assert "non-finite" in stream.text and "server_error" in stream.text


def test_error_kinds_map_to_exit_and_http_status():
    from skipjack.server.errors import failure

    cases = [(SkipjackError("x"), 400, "x"), (Unavailable("locked"), 503, "locked"), (Fault("nan"), 500, "internal")]
    cases.append((KeyError("k"), 500, "internal error: KeyError"))
    for e, status, text in cases:
        assert errors.http_status(e) == status and errors.message(e).startswith(text)
        r = failure(e)
        assert r.status_code == status and json.loads(r.body)["error"]["message"].startswith(text)
        assert ("retry-after" in r.headers) == (status == 503)
    assert issubclass(Unavailable, SkipjackError) and not issubclass(Fault, SkipjackError)


def test_run_command_exit_statuses(capsys):
    def boom(e):
        def body():
            raise e

        return body

    assert errors.run_command(boom(SkipjackError("bad"))) == 2
    assert errors.run_command(boom(Unavailable("disk full"))) == 2
    assert errors.run_command(boom(Fault("nan"))) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["skipjack: error: bad", "skipjack: error: disk full", "skipjack: internal error: nan"]


def test_a_held_lock_is_unavailable(tmp_path, monkeypatch):
    import fcntl

    from skipjack import store

    lock = tmp_path / "x.lock"
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(Unavailable, match="is locked by another process"), store.locked(lock, "a test", 0.05):
            pass
