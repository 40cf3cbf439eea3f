"""Layer-wise Quantization (`skipjack quantize`, `skipjack.tools.lwq`): rankings are deterministic and put a planted
unimportant layer last (so it is quantised first); the allocation meets the bit budget; the artefact loads
through `--model` and, at 4 bits, is token-identical to the source at q4; bad budgets and damaged or foreign
artefacts are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import byte_bpe_tokenizer, hf_model

from skipjack.cli import main as cli_main
from skipjack.decoding.sampling import SamplingParams
from skipjack.engine import Engine, Request
from skipjack.errors import SkipjackError
from skipjack.loading.load import load
from skipjack.tools import lwq


@pytest.fixture
def home(tmp_path, monkeypatch):
    from skipjack.weights.kernels import kernels

    kernels()  # built (or found) under the usual home first: a fresh home would build them again
    monkeypatch.setenv("SKIPJACK_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _folder(tmp_path, plant: str | None = None, layers: int = 6):
    tok = byte_bpe_tokenizer()
    m = hf_model("llama", seed=7, vocab=len(tok), max_position_embeddings=128, num_hidden_layers=layers)
    m.config.eos_token_id = tok.eos_token_id
    with torch.no_grad():
        mlp, attn = m.model.layers[3].mlp, m.model.layers[3].self_attn
        if plant == "lim":  # the layer adds nothing to the residual stream: cos(in, out) = 1
            mlp.down_proj.weight.zero_()
            attn.o_proj.weight.zero_()
        elif plant == "zd":  # every weight of a tensor equal: no outlier (|z| > 1) at all
            for lin in (mlp.down_proj, mlp.up_proj, mlp.gate_proj, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                lin.weight.fill_(0.02)
    folder = tmp_path / f"src-{plant}"
    m.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("score", ["lim", "zd"])
def test_a_planted_unimportant_layer_is_ranked_last_and_quantised_first(tmp_path, home, score):
    src = _folder(tmp_path, plant=score)
    entry, info = lwq.quantize(str(src), 7.5, score=score)
    assert lwq.ranking(info["scores"], "importance")[-1] == 3
    assert 3 not in info["high"] and len(info["high"]) == 5  # 7.5 bits: every layer in q8 but one
    again = lwq.quantize(str(src), 7.5, score=score)[1]
    assert again["scores"] == info["scores"]  # deterministic
    rev = lwq.quantize(str(src), 4.8, order="reverse", score=score)[1]
    assert rev["high"] == [3]  # the reverse order spends the bits on it first


def test_allocation_meets_the_budget():
    params = [10, 20, 30, 40]
    assert lwq.allocate([3, 2, 1, 0], params, 4.0) == set()
    assert lwq.allocate([3, 2, 1, 0], params, 8.0) == {0, 1, 2, 3}
    assert lwq.allocate([3, 2, 1, 0], params, 6.0) == {3}  # 40 of 100 in q8 is 5.6 bits; 30 more would be 6.8
    assert lwq.allocate([3, 2, 1, 0], params, 5.5) == set()
    assert lwq.allocate([0, 1, 2, 3], params, 6.0) == {0, 1}  # 10 + 20 in q8: 5.2 bits; 30 more would be 6.4
    assert lwq.ranking([0.1, 0.9, 0.5], "random", 1) == lwq.ranking([0.1, 0.9, 0.5], "random", 1)


def test_the_artefact_loads_and_at_four_bits_equals_the_source_at_q4(tmp_path, home):
    src = _folder(tmp_path)
    low, info = lwq.quantize(str(src), 4.0)
    assert info["high"] == [] and info["average_bits"] == 4.0
    art, ref = Engine(load(str(low))), Engine(load(str(src), "q4"))
    assert art.loaded.dtype == "q4"  # "auto" loads an artefact as its blocks
    req = lambda: Request([5, 6, 7, 8, 5, 6], SamplingParams(max_new_tokens=12))  # noqa: E731
    assert art.complete(req()).tokens == ref.complete(req()).tokens
    mixed, info = lwq.quantize(str(src), 6.0)
    model = load(str(mixed)).model
    formats = {i: model.layers[i].wd.kind for i in range(6)}  # a QuantLinear's block format
    assert {i for i, k in formats.items() if k == "q8"} == set(info["high"]) != set()
    assert {model.layers[i].wqkv.kind for i in info["high"]} == {"q8"}


@pytest.mark.parametrize("bits", ["3.9", "8.5", "nan", "-1"])
def test_a_bit_budget_out_of_range_is_one_line(tmp_path, home, bits, capsys):
    src = str(_folder(tmp_path))
    capsys.readouterr()  # the checkpoint writer's progress
    assert cli_main(["quantize", "--model", src, "--bits", bits]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--bits must be a number from 4" in err


def test_damaged_and_foreign_artefacts_are_one_line(tmp_path, home, capsys):
    src = _folder(tmp_path)
    entry, _ = lwq.quantize(str(src), 5.0)
    blob = entry / "blocks.safetensors"
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(SkipjackError, match="damaged"):
        load(str(entry))
    entry, _ = lwq.quantize(str(src), 5.0)  # rewritten whole
    meta = json.loads((entry / "skipjack.json").read_text())
    meta["lwq"] = {"bits": "five"}
    (entry / "skipjack.json").write_text(json.dumps(meta))
    assert cli_main(["generate", "--model", str(entry), "-n", "2", "hello"]) == 2
    assert "not a layer-wise quantization artefact" in capsys.readouterr().err
    assert cli_main(["quantize", "--model", str(src), "--bits", "5", "--order", "sideways"]) == 2


def test_on_the_all_4_bit_default_model_a_4_bit_artefact_is_the_model():
    """SmolLM2's GGUF is Q4_1 in every layer: at 4 bits every layer keeps its blocks as stored, so the artefact
    gives the source's exact tokens. (Written under the usual home, where the model is already fetched.)"""
    from skipjack.loading.load import DEFAULT_MODEL

    entry, info = lwq.quantize(DEFAULT_MODEL, 4.0, score="zd")
    assert info["high"] == [] and info["average_bits"] == 4.0
    ids = [1, 504, 3458, 314, 260, 1345, 28]
    req = lambda: Request(list(ids), SamplingParams(max_new_tokens=24))  # noqa: E731
    ref = Engine.load(DEFAULT_MODEL, tune=False).complete(req()).tokens
    assert Engine(load(str(entry))).complete(req()).tokens == ref
