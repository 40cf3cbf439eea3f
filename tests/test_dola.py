"""DoLa (`strategies/dola.py`): with no contrast (weight 0, no penalty) it decodes plain's tokens; the premature
layer is the candidate of largest Jensen-Shannon divergence, checked against a hand computation; the
scores are log q_N - log q_M on the plausible set only; options are checked; it is labelled lossy."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import hf_model, ours_from_hf

from skipjack.decoding.plan import Plan
from skipjack.decoding.sampling import SamplingParams
from skipjack.decoding.sequence import generate
from skipjack.errors import SkipjackError
from skipjack.methods import MethodSpec, build
from skipjack.strategies.dola import IMPLAUSIBLE, DoLa, candidates, contrast


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(hf_model("llama", seed=11, vocab=64, num_hidden_layers=6), torch.float64)


PROMPT = [3, 17, 5, 40, 22, 9]


def _decode(model, strategy, n=12, penalty=1.0):
    params = SamplingParams(max_new_tokens=n, repetition_penalty=penalty)
    return [t for s in generate(model, PROMPT, params, Plan(None, None, strategy=strategy)) for t in s.tokens]


def test_no_contrast_is_plain_decoding(model):
    plain = _decode(model, None)
    assert _decode(model, DoLa(weight=0.0, penalty=1.0)) == plain
    assert _decode(model, DoLa(layers="low", weight=0.0, penalty=1.0)) == plain


def _hand_jsd(p: list[float], q: list[float]) -> float:
    m = [(a + b) / 2 for a, b in zip(p, q)]
    kl = lambda x: sum(a * math.log(a / c) for a, c in zip(x, m) if a > 0)  # noqa: E731
    return 0.5 * kl(p) + 0.5 * kl(q)


def test_the_premature_layer_has_the_largest_divergence_and_the_scores_are_the_contrast(model):
    ids = torch.tensor([PROMPT])
    cands = candidates("0-4", model.num_layers)
    out = model(ids, return_hidden=range(model.num_layers), logits="all")
    early = torch.stack([model.head(model.embed(ids) if j == 0 else out.hidden[j - 1])[0] for j in cands])
    scores, pick = contrast(out.logits[0], early, 0.1, 1.0)
    final = torch.softmax(out.logits[0].double(), -1)
    for t in range(len(PROMPT)):
        divs = [_hand_jsd(final[t].tolist(), torch.softmax(e[t].double(), -1).tolist()) for e in early]
        assert int(pick[t]) == max(range(len(cands)), key=lambda k: divs[k])
        logq, logm = torch.log(final[t]), torch.log_softmax(early[int(pick[t])][t].double(), -1)
        plausible = final[t] >= 0.1 * final[t].max()
        want = torch.where(plausible, logq - logm, torch.full_like(logq, IMPLAUSIBLE))
        assert torch.allclose(scores[t].double(), want, atol=1e-5)
        assert int(scores[t].argmax()) in torch.nonzero(plausible).flatten().tolist()


def test_the_paper_repetition_penalty_applies_unless_the_request_sets_one(model):
    assert _decode(model, DoLa(weight=0.0)) == _decode(model, None, penalty=1.2)
    assert _decode(model, DoLa(weight=0.0), penalty=1.5) == _decode(model, None, penalty=1.5)


def test_candidate_layers_follow_the_papers_code():
    assert candidates("low", 30) == list(range(0, 15, 2)) and candidates("high", 30) == list(range(15, 30, 2))
    assert candidates("high", 48) == list(range(28, 48, 2)) and candidates("2-4", 30) == [2, 3, 4]


@pytest.mark.parametrize(
    "spec, says",
    [
        ("dola:layers=9-3", "A <= B"),
        ("dola:layers=mid", "low, high or A-B"),
        ("dola:alpha=0", "alpha must be"),
        ("dola:alpha=1.5", "alpha must be"),
        ("dola:weight=-1", "weight must be"),
        ("dola:penalty=0.5", "penalty"),
        ("dola:k=3", "k"),
    ],
)
def test_bad_options_are_one_line_errors(spec, says):
    with pytest.raises(SkipjackError, match=says) as e:
        MethodSpec.parse(spec)
    assert "\n" not in str(e.value)


def test_dola_is_a_lossy_strategy_and_too_many_layers_fail_at_begin(model):
    spec = MethodSpec.parse("dola:layers=high")
    assert not spec.lossless and spec.strategy_class is DoLa
    strategy = build(spec)
    with pytest.raises(SkipjackError, match="below the final layer"):
        DoLa(layers="2-9").begin(model, 3, 4)
    strategy.begin(model, len(PROMPT), 4)
    assert strategy.cands == candidates("high", model.num_layers)
