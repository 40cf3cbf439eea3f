"""Lossy per-layer strategies (`skipjack.strategies`: ffn-skip, layer-skip, skipdecode): at zero skip each is
token-identical to plain; skipping, each runs the layers it says and the teacher-forced pass (what `skipjack
eval` measures) equals decoding step by step; a planted do-nothing FFN is the one FFN-skip skips first; bad settings
are one-line errors; they are labelled lossy."""

from __future__ import annotations

import pytest
import torch
from conftest import byte_bpe_tokenizer, hf_model, ours_from_hf

from skipjack import methods
from skipjack.decoding.sampling import SamplingParams
from skipjack.decoding.session import Session
from skipjack.engine import Engine, Request
from skipjack.errors import SkipjackError
from skipjack.loading.load import Loaded
from skipjack.loading.tokenizer import Tokenizer
from skipjack.methods import MethodSpec
from skipjack.strategies import FFNSkip, LayerSkip, SkipDecode

FAMILIES = ["llama", "gemma3_text", "qwen2-sw"]


def _engine(family: str, layers: int = 6, weights: str | None = "q4") -> Engine:
    tok = byte_bpe_tokenizer()
    hf = hf_model(family, seed=5, vocab=len(tok), max_position_embeddings=256, num_hidden_layers=layers)
    m = ours_from_hf(hf, weights=weights)
    return Engine(Loaded(m, Tokenizer(tok, tok.chat_template, tok.eos_token_id), family, None, 0, False))


@pytest.fixture(scope="module", params=FAMILIES)
def engine(request):
    return _engine(request.param)


PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 5, 6]


def _run(engine, method, n=24, prompt=PROMPT):
    return engine.complete(Request(list(prompt), SamplingParams(max_new_tokens=n), method))


@pytest.mark.parametrize(
    "spec",
    [
        "layer-skip:ratio=0",
        "skipdecode:lo=0,hi=0",
        "ffn-skip:keep_first=3,keep_last=3",
        "ffn-skip:threshold=1",
        "ffn-skip:max_share=0",
    ],
)
def test_zero_skip_is_plain(engine, spec):
    assert not MethodSpec.parse(spec).lossless
    res = engine.complete(Request(list(PROMPT), SamplingParams(max_new_tokens=24), spec))
    assert res.tokens == _run(engine, "plain").tokens and not res.lossless
    assert res.layers["layers_skipped_share"] == 0 and res.layers["ffn_skipped_share"] == 0


@pytest.mark.parametrize(
    "spec",
    ["layer-skip:ratio=0.34", "skipdecode:lo=0.2,hi=0.8", "ffn-skip:threshold=0,max_share=0.34,warmup=2,period=5"],
)
def test_skipping_runs_and_counts_what_it_skipped(engine, spec):
    res = engine.complete(Request(list(PROMPT), SamplingParams(max_new_tokens=40), spec))
    st = res.layers
    assert res.new_tokens == 40 and st["tokens"] == 39  # the first token comes from the (full) prompt pass
    if spec.startswith("layer-skip"):
        assert st["skipped_layers"] == [2, 4] and st["layers_skipped_share"] == pytest.approx(2 / 6)
    elif spec.startswith("skipdecode"):
        assert 0 < st["layers_skipped_share"] < 0.8
    else:  # threshold 0, room for 2: both middle FFNs (layers 2, 3) are skipped between full steps
        full = 2 + len(range(2, 39, 5))  # warm-up tokens and one per period
        assert st["ffn_skipped_share"] == pytest.approx((39 - full) * 2 / (39 * 6))


def test_layer_skip_spreads_evenly_and_keeps_first_and_last():
    s = LayerSkip(0.5)
    s.begin(type("M", (), {"num_layers": 30})(), 10, 10)
    assert len(s.skipped) == 15 and 0 not in s.skipped and 29 not in s.skipped
    gaps = {b - a for a, b in zip(s.skipped, s.skipped[1:])}
    assert gaps <= {1, 2}


def test_skipdecode_exit_never_rises():
    s = SkipDecode(lo=0.1, hi=0.9, warmup=2)
    s.begin(type("M", (), {"num_layers": 24})(), 10, 100)
    sk = [s.skips(t) for t in range(120)]
    assert sk == sorted(sk) and sk[0] == round(21 * 0.1) and sk[-1] == round(21 * 0.9)


@pytest.mark.parametrize(
    "spec", ["layer-skip:ratio=0.34", "skipdecode:lo=0,hi=0.8", "ffn-skip:threshold=0,max_share=0.5,warmup=3"]
)
def test_teacher_forced_pass_equals_decoding_step_by_step(spec):
    """`skipjack eval` runs a strategy's forward over a whole continuation: its logits equal decoding the same
    tokens one step at a time (fp32 here: the dense model's rounding differs a little between widths)."""
    model = _engine("llama", weights=None).model
    cont = [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31]
    logits = []
    for whole in (True, False):
        m = methods.build(MethodSpec.parse(spec))
        m.begin(model, len(PROMPT), len(cont) + 1)
        cache = model.make_cache(64)
        model(torch.tensor([PROMPT]), cache, logits="none")
        if whole:
            logits.append(m.forward(model, torch.tensor([cont]), cache, 0).logits[0])
        else:
            logits.append(
                torch.cat([m.forward(model, torch.tensor([[t]]), cache, i).logits[0] for i, t in enumerate(cont)])
            )
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)


def test_ffn_skip_skips_a_planted_do_nothing_ffn_first():
    """A middle layer whose FFN adds nothing (down projection zeroed) has cosine 1, the most saturated: with room
    for one skip it is the one skipped, whatever the threshold lets through."""
    e = _engine("llama", layers=8, weights=None)
    e.model.layers[4].wd.weight.data.zero_()
    for threshold in (0.999999, 0.0):
        s = FFNSkip(threshold=threshold, max_share=1 / 8, warmup=2, keep_first=1, keep_last=1)
        s.begin(e.model, len(PROMPT), 8)
        cache = e.model.make_cache(64)
        e.model(torch.tensor([PROMPT]), cache, logits="none")
        s.forward(e.model, torch.tensor([[3]]), cache, 0)
        assert s.skip == [4]
    s = FFNSkip(threshold=0.0, max_share=1.0, keep_first=1, keep_last=1)  # no cap: every middle FFN
    s.begin(e.model, len(PROMPT), 8)
    cache = e.model.make_cache(64)
    e.model(torch.tensor([PROMPT]), cache, logits="none")
    s.forward(e.model, torch.tensor([[3]]), cache, 0)
    assert s.skip == [1, 2, 3, 4, 5, 6]


def test_batched_lossy_sequence_equals_alone():
    e = _engine("llama")
    reqs = lambda: [  # noqa: E731
        Request(list(PROMPT), SamplingParams(max_new_tokens=12), "layer-skip:ratio=0.34"),
        Request([9, 10, 11], SamplingParams(max_new_tokens=10), "pld"),
        Request([30, 31, 30, 31], SamplingParams(max_new_tokens=9), "skipdecode"),
    ]
    alone = [e.complete(r).tokens for r in reqs()]
    assert [r.tokens for r in e.generate_batch(reqs())] == alone


def test_a_conversation_goes_on_after_a_skipping_turn():
    """A turn with skipped layers leaves their keys missing: the next turn prefills afresh (and runs)."""
    e = _engine("llama")
    s = Session()
    for turn in (PROMPT, PROMPT + [40, 41, 42]):
        r = e.complete(Request(list(turn), SamplingParams(max_new_tokens=6), "layer-skip:ratio=0.34", session=s))
        assert r.new_tokens == 6


@pytest.mark.parametrize(
    "spec, message",
    [
        ("layer-skip:ratio=1", r"ratio must be a number in \[0, 1\)"),
        ("layer-skip:ratio=-0.1", r"ratio must be a number in \[0, 1\)"),
        ("layer-skip:ratio=x", "ratio must be a number"),
        ("skipdecode:lo=0.6,hi=0.2", "lo .* must not exceed hi"),
        ("ffn-skip:threshold=1.5", r"threshold must be a number in \[0, 1\]"),
        ("ffn-skip:period=0", "period must be an integer >= 1"),
        ("ffn-skip:k=3", "does not apply"),
        ("layer-skip:depth=2", "unknown option"),
    ],
)
def test_bad_settings_are_one_line_errors(spec, message):
    with pytest.raises(SkipjackError, match=message) as e:
        MethodSpec.parse(spec)
    assert "\n" not in str(e.value)


def test_a_ratio_too_high_for_the_model_is_one_line():
    e = _engine("llama", layers=4)
    with pytest.raises(SkipjackError, match="at most 2"):
        _run(e, "layer-skip:ratio=0.9")
