"""Incremental detokenization and stop strings."""

from __future__ import annotations

from conftest import byte_bpe_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from skipjack.text import _held_back
from skipjack.tokenizer import StreamDecoder, Tokenizer

TEXTS = ["héllo wörld 日本語 🙂 naïve café", "the quick brown fox 🙂🙂 jumps", "  leading spaces kept"]


def tok():
    return Tokenizer(byte_bpe_tokenizer(), None, None)


@settings(max_examples=60, deadline=None)
@given(text=st.sampled_from(TEXTS), chunks=st.lists(st.integers(1, 4), min_size=1, max_size=40))
def test_stream_decoder_never_splits_characters(text, chunks):
    t = tok()
    ids = t.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    dec = StreamDecoder(t, t.encode("context: ", add_special_tokens=False))
    out, i = [], 0
    for n in chunks * 50:
        if i >= len(ids):
            break
        delta = dec.push(ids[i : i + n])
        assert "\ufffd" not in delta
        out.append(delta)
        i += n
    if i < len(ids):
        out.append(dec.push(ids[i:]))
    out.append(dec.flush())
    assert "".join(out) == text


def test_leading_space_is_kept_with_metaspace_tokenizer():
    """SentencePiece-style tokenizers drop a leading space when decoding ids alone; the stream keeps it."""
    from tokenizers import Tokenizer as RawTok
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = RawTok(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    raw.train_from_iterator(["hello world again", "world hello"], trainers.BpeTrainer(special_tokens=["<unk>"]))
    t = Tokenizer(PreTrainedTokenizerFast(tokenizer_object=raw), None, None)
    prompt = t.encode("hello", add_special_tokens=False)
    gen = t.encode("hello world", add_special_tokens=False)[len(prompt) :]
    assert t.decode(gen) == "world"  # the naive decode loses the space
    dec = StreamDecoder(t, prompt)
    assert dec.push(gen) + dec.flush() == " world"


def test_held_back_prefix_of_stop_string():
    assert _held_back("abc</s", ("</stop>",)) == 3
    assert _held_back("abc", ("</stop>",)) == 0
    assert _held_back("x<", ("<a>", "<<b")) == 1


def test_stop_strings_cut_text(tiny_folder):
    from skipjack.engine import Engine, Request
    from skipjack.sampling import SamplingParams

    engine = Engine.load(str(tiny_folder))
    prompt = engine.tokenizer.prompt_ids("hello world")
    params = SamplingParams(max_new_tokens=30)
    full = engine.complete(Request(prompt, params))
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = engine.complete(Request(prompt, params, stop=(stop,)))
    assert cut.text == full.text[: full.text.find(stop)] and cut.finish == "stop"
    streamed = []
    engine.complete(Request(prompt, params, "pld", (stop,)), streamed.append)
    assert "".join(streamed) == cut.text
