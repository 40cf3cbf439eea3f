"""`skipjack inspect` (`tools/lens.py`): the logit lens's last layer is the model's own logits, each layer's
ranks and probabilities are those of its own projection, the neurons' scores are the hand-computed dot
products, the layer probe reads its early-exit agreement from the lens, and the command's outputs and errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hf_model, ours_from_hf

from skipjack.tools import lens
from skipjack.weights.linear import dense


@pytest.fixture(scope="module", params=["q4", "fp32"])
def model(request):
    hf = hf_model("llama", seed=5, vocab=64, num_hidden_layers=3)
    return ours_from_hf(hf, weights="q4") if request.param == "q4" else ours_from_hf(hf, torch.float32)


IDS = [5, 9, 2, 33, 17, 8, 60, 1]


def test_the_last_layers_projection_is_the_models_own_logits(model):
    out = model(torch.tensor([IDS]), return_hidden=range(model.num_layers), logits="all")
    assert torch.equal(model.head(out.hidden[model.num_layers - 1])[0], out.logits[0].float())
    views, final = lens.lens(model, IDS, top=3)
    assert torch.equal(final, out.logits[0].float())
    last = views[-1]
    assert last.answer_rank == [0] * len(IDS) and last.argmax == final.argmax(-1).tolist()
    assert last.top[0][0] == int(final[-1].argmax())


def test_each_layer_reports_its_own_projections_rank_and_probability(model):
    out = model(torch.tensor([IDS]), return_hidden=range(model.num_layers), logits="all")
    answer = out.logits[0].float().argmax(-1)  # [T]
    views, _ = lens.lens(model, IDS, top=4)
    for i, v in enumerate(views):
        logits = model.head(out.hidden[i])[0]  # [T, V]
        probs = torch.softmax(logits, -1)
        for pos in range(len(IDS)):
            order = sorted(range(logits.shape[1]), key=lambda t: -float(logits[pos, t]))
            assert v.answer_rank[pos] == order.index(int(answer[pos]))  # no ties in random fp logits
            assert v.answer_prob[pos] == pytest.approx(float(probs[pos, answer[pos]]))
        assert [t for t, _ in v.top] == order[:4] and len(v.argmax) == len(IDS)
    assert lens.agreement(views, answer.tolist())[-1] == 1.0


def test_neurons_are_ranked_by_their_hand_computed_scores(model):
    token = 7
    u = dense(model.lm_head)[token] * model.norm_weight.float()  # [D]
    scores = [(float(u @ dense(layer.wd)[:, j]), i, j) for i, layer in enumerate(model.layers)
              for j in range(layer.wd.in_features)]  # fmt: skip
    best = sorted(scores, reverse=True)[:5]
    got = lens.neurons(model, token, 5)
    assert [(n.layer, n.index) for n in got] == [(i, j) for _, i, j in best]
    assert [n.score for n in got] == pytest.approx([s for s, _, _ in best], rel=1e-5)
    with pytest.raises(Exception, match="not in"):
        lens.neurons(model, 10**6)


def _inspect(capsys, folder, *args):
    """`skipjack inspect` in this process: (exit status, stdout, stderr)."""
    from skipjack.cli import main

    code = main(["inspect", "--model", str(folder), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_the_command_prints_text_json_and_a_heat_map(tiny_folder, tmp_path, capsys):
    code, out, err = _inspect(capsys, tiny_folder, "hello there world", "--token", "7", "--neurons", "3")
    assert code == 0, err
    assert "layer | rank" in out and "FFN neurons that most promote" in out
    png = tmp_path / "lens.png"
    code, out, err = _inspect(capsys, tiny_folder, "hello there world", "--json", "--png", str(png), "--top", "2")
    assert code == 0, err
    d = json.loads(out)
    assert len(d["layers"]) == 2 and len(d["layers"][0]["top"]) == 2 and d["pieces"] and d["neurons"] == []
    assert d["layers"][-1]["answer_rank"] == [0] * len(d["tokens"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args, says",
    [
        (["x", "--top", "0"], "--top must be"),
        (["x", "--neurons", "500"], "--neurons must be"),
        (["x", "--token", "hello there world"], "give one token's text or its id"),
        (["x", "--token", "99999999"], "not in"),
        ([""], "the prompt"),
        (["x", "--png", "/nonexistent/dir/a.png"], "/nonexistent/dir/a.png"),
    ],
)
def test_bad_options_are_one_line_errors(tiny_folder, args, says, capsys):
    code, _, err = _inspect(capsys, tiny_folder, *args)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
