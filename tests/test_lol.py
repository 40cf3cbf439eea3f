"""LOL (`strategies/lol.py`): with no contrast (weight, fuse and refocus 0, no penalty) it decodes plain's tokens;
with fuse and refocus 0 it is DoLa; every token it picks is the argmax of the paper's fused score, computed here
by hand from full forwards of the context and of the refocus context (instruction + context); options are
checked; it is labelled lossy."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_model, ours_from_hf

from skipjack.decoding.plan import Plan
from skipjack.decoding.sampling import SamplingParams
from skipjack.decoding.sequence import generate
from skipjack.errors import SkipjackError
from skipjack.methods import MethodSpec, build
from skipjack.strategies.dola import DoLa, candidates, jsd
from skipjack.strategies.lol import LOL


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(hf_model("llama", seed=5, vocab=64, num_hidden_layers=8), torch.float64)


PROMPT = [3, 17, 5, 40, 22, 9]
GUIDE = [7, 8, 9, 10]


def _decode(model, strategy, n=10, penalty=1.0):
    params = SamplingParams(max_new_tokens=n, repetition_penalty=penalty)
    return [t for s in generate(model, PROMPT, params, Plan(None, None, strategy=strategy)) for t in s.tokens]


def test_no_contrast_is_plain_and_no_fusion_is_dola(model):
    assert _decode(model, LOL(weight=0, fuse=0, refocus=0, penalty=1)) == _decode(model, None)
    dola = _decode(model, DoLa(layers="low", penalty=1))
    assert _decode(model, LOL(layers="low", fuse=0, refocus=0, penalty=1)) == dola


def _hand_scores(model, ctx: list[int], guided: list[int], low: int, cands, below, fuse, refocus):
    """The fused score at the last position of `ctx`, from full forwards (no cache reuse)."""
    n = model.num_layers
    out = model(torch.tensor([ctx]), return_hidden=range(n), logits="all")
    hs = {j: (model.embed(torch.tensor([ctx])) if j == 0 else out.hidden[j - 1])[0, -1] for j in range(n)}
    lp = {j: torch.log_softmax(model.head(hs[j][None, None])[0, 0].double(), -1) for j in hs}
    logq = torch.log_softmax(out.logits[0, -1].double(), -1)

    def premature(top, js):
        return lp[js[int(torch.stack([jsd(top, lp[j]) for j in js]).argmax())]]

    s = (logq - premature(logq, cands)) + fuse * (lp[low] - premature(lp[low], below))
    g = torch.log_softmax(model(torch.tensor([guided]), logits="last").logits[0, -1].double(), -1)
    s = s + refocus * (g - logq)
    plausible = logq >= logq.max() + torch.log(torch.tensor(0.1))
    return torch.where(plausible, s, torch.full_like(s, -1e30))


def test_every_token_is_the_argmax_of_the_fused_score_with_the_refocus_context(model):
    lol = LOL(layers="0-4", lower=6, fuse=0.7, refocus=0.6, penalty=1)
    lol.guide_ids = GUIDE
    out = _decode(model, lol, n=6)
    low, cands, below = lol.levels(model)
    assert (low, cands, below) == (6, candidates("0-4", 8), candidates("0-4", 8))
    for i, tok in enumerate(out):
        ctx = PROMPT + out[:i]
        want = _hand_scores(model, ctx, GUIDE + ctx, low, cands, below, 0.7, 0.6)
        assert tok == int(want.argmax()), i
    assert sum(lol.stats()["premature_layers"].values()) == len(out)


@pytest.mark.parametrize(
    "spec, says",
    [
        ("lol:lower=0", "lower must be"),
        ("lol:fuse=-1", "fuse must be"),
        ("lol:refocus=9", "refocus must be"),
        ("lol:weight=5", "weight must be"),
        ("lol:alpha=0", "alpha must be"),
        ("lol:layers=top", "low, high or A-B"),
        ("lol:penalty=0.2", "penalty"),
    ],
)
def test_bad_options_are_one_line_errors(spec, says):
    with pytest.raises(SkipjackError, match=says) as e:
        MethodSpec.parse(spec)
    assert "\n" not in str(e.value)


def test_lol_is_lossy_and_a_lower_layer_past_the_top_fails_at_begin(model):
    spec = MethodSpec.parse("lol")
    assert not spec.lossless and spec.strategy_class is LOL and isinstance(build(spec), LOL)
    with pytest.raises(SkipjackError, match="below the final layer"):
        LOL(lower=8).begin(model, 3, 4)
