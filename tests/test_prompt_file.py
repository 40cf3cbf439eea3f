"""A prompt cache saved to a file (`skipjack.prompt_file`, `skipjack generate --prompt-cache`): what is loaded
is exactly what was saved, a later request reuses it and decodes as a fresh one, and a bad or foreign file is
refused or replaced, never half written."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from test_prompt_cache import GREEDY, assert_holds_what_it_says, decode

from skipjack import integrity
from skipjack.decoding.session import Session
from skipjack.errors import SkipjackError
from skipjack.prompt_file import check_path, fingerprint, load_prompt_cache, save_prompt_cache


def _same_bits(a, b):
    assert a.offset == b.offset and a.capacity == b.capacity
    for la, lb in zip(a, b):
        assert type(la) is type(lb)
        ka, va, fa = la.stored()
        kb, vb, fb = lb.stored()
        assert fa == fb and torch.equal(ka, kb) and torch.equal(va, vb)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_a_saved_cache_loads_back_exactly_and_is_reused(tiny_llama64, sliding_gemma64, family, tmp_path):
    """Save after one request, load in a new Session (as a new process would): every layer holds the same
    bits at the same positions (the Gemma request is long enough that its sliding layers have evicted). A
    follow-up prompt extending the first reuses the loaded prefix and decodes exactly as a fresh request."""
    model = tiny_llama64 if family == "llama" else sliding_gemma64
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 48, (30 if family == "llama" else 300,), generator=g).tolist()
    path = tmp_path / "p.cache"
    pc = Session()
    out, _ = decode(model, prompt, GREEDY, "pld", prompt_cache=pc)
    save_prompt_cache(path, pc)
    loaded = load_prompt_cache(path, model)
    assert loaded.tokens == pc.tokens and loaded.model is model
    _same_bits(loaded.cache, pc.cache)
    assert family == "llama" or any(layer.stored()[2] > 0 for layer in loaded.cache)
    follow = prompt + out + [7, 8, 9, 10]
    again, steps = decode(model, follow, GREEDY, "ngram", prompt_cache=loaded)
    assert again == decode(model, follow, GREEDY)[0]
    assert steps[0].forward_tokens == len(follow) - len(pc.tokens)
    assert_holds_what_it_says(model, loaded)
    assert [p.name for p in tmp_path.iterdir()] == ["p.cache"]  # no temporary file left behind


def test_another_models_cache_is_replaced_with_a_notice(tiny_llama64, tiny_gemma64, tmp_path):
    path = tmp_path / "p.cache"
    pc = Session()
    decode(tiny_llama64, [3, 4, 5, 6] * 3, GREEDY, prompt_cache=pc)
    save_prompt_cache(path, pc)
    said = []
    other = load_prompt_cache(path, tiny_gemma64, said.append)
    assert other.cache is None and len(said) == 1 and "another model" in said[0]
    assert fingerprint(tiny_llama64) != fingerprint(tiny_gemma64)
    assert load_prompt_cache(tmp_path / "missing.cache", tiny_llama64).cache is None  # no file yet: empty


def test_a_file_that_is_not_a_prompt_cache_is_refused_and_left_alone(tiny_llama64, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("my notes")
    for call in (lambda: check_path(bad), lambda: load_prompt_cache(bad, tiny_llama64)):
        with pytest.raises(SkipjackError, match="not a skipjack prompt cache; not touching it"):
            call()
    assert bad.read_text() == "my notes"
    with pytest.raises(SkipjackError, match="is a folder"):
        check_path(tmp_path)
    with pytest.raises(SkipjackError, match="does not exist"):
        check_path(tmp_path / "nope" / "p.cache")


def test_a_damaged_cache_is_a_one_line_error(tiny_llama64, tmp_path):
    """A file with our header but tensors that do not fit the model (here: one layer's keys cut short)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "p.cache"
    pc = Session()
    decode(tiny_llama64, [3, 4, 5, 6] * 3, GREEDY, prompt_cache=pc)
    save_prompt_cache(path, pc)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["0.k"] = tensors["0.k"][:, :, :-1].contiguous()
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(SkipjackError, match="is damaged .*checksum.*delete it to rebuild"):
        load_prompt_cache(path, tiny_llama64)
    save_file(tensors, str(path), metadata=meta | {"digest": integrity.digest(tensors)})  # edited consistently
    with pytest.raises(SkipjackError, match="is damaged .*do not fit.*delete it to rebuild"):
        load_prompt_cache(path, tiny_llama64)
    save_file(tensors, str(path), metadata=meta | {"tokens": "[1, 2"})
    with pytest.raises(SkipjackError, match="is damaged"):
        load_prompt_cache(path, tiny_llama64)


def test_a_failed_write_keeps_the_old_file(tiny_llama64, tmp_path, monkeypatch):
    path = tmp_path / "p.cache"
    pc = Session()
    decode(tiny_llama64, [3, 4, 5, 6] * 3, GREEDY, prompt_cache=pc)
    save_prompt_cache(path, pc)
    before = path.read_bytes()
    decode(tiny_llama64, [3, 4, 5, 6] * 3 + [9, 9], GREEDY, prompt_cache=pc)

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    with pytest.raises(SkipjackError, match="cannot write the prompt cache .*(?i:no space left)"):
        save_prompt_cache(path, pc)
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["p.cache"]


def test_generate_with_a_prompt_cache_file(capsys, tiny_folder, tmp_path):
    """Two CLI runs: the second prompt starts with the first, so most of it comes from the file, and the text
    equals a run without the cache. A bad path fails before the model loads, with one line."""
    from test_cli import run_cli

    path = tmp_path / "doc.cache"
    base = ["generate", "--model", str(tiny_folder), "-n", "6", "--raw", "--prompt-cache", str(path)]
    doc = "the quick brown fox jumps over the lazy dog " * 3
    code, _, err = run_cli(capsys, *base, doc + "hello")
    assert code == 0, err
    assert re.search(r"0 of (\d+) prompt tokens from", err) and path.exists()
    code, out, err = run_cli(capsys, *base, "--json", doc + "stop here please")
    res = json.loads(out)
    assert code == 0 and 0 < res["cached_tokens"] < res["prompt_tokens"]
    plain = json.loads(run_cli(capsys, *base[:-2], "--json", doc + "stop here please")[1])
    assert res["tokens"] == plain["tokens"] and plain["cached_tokens"] == 0
    (tmp_path / "x.txt").write_text("mine")
    for bad in (str(tmp_path / "x.txt"), str(tmp_path / "no" / "a.cache")):
        code, _, err = run_cli(capsys, *base[:-1], bad, "hi")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (tmp_path / "x.txt").read_text() == "mine"
