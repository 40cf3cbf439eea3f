"""Incremental detokenization, stop strings, and reading tokenizers and chat templates as transformers does."""

from __future__ import annotations

import json

import pytest
from conftest import CORPUS, byte_bpe_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from skipjack.loading.tokenizer import StreamDecoder, Tokenizer
from skipjack.text import _held_back

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
    from skipjack.decoding.sampling import SamplingParams
    from skipjack.engine import Engine, Request

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


# --- reading a folder's tokenizer without transformers, and chat templates: both as transformers does them ---

PARITY_TEXTS = TEXTS + [
    "",
    "\n\n  \t x",
    "def f(x):\n\treturn x  # ok\n",
    "<eos>hello<eos> [UNK] </s> <s_new> <|im_end|>",
    "I'm sure you've 1234567 3.14 CAPS",
    "Å e\u0301 ﬁ",  # NFC changes these (Qwen2's normaliser)
]


def assert_same_tokenizer(folder):
    """`read_fast` reads the folder and tokenizes as transformers' AutoTokenizer does."""
    import random

    from transformers import AutoTokenizer

    from skipjack.loading.tokenizer import read_fast

    fast, hf = read_fast(folder), AutoTokenizer.from_pretrained(str(folder))
    assert fast is not None, f"no fast path for {folder}"
    for text in PARITY_TEXTS:
        for special in (True, False):
            assert fast.encode(text, special) == hf.encode(text, add_special_tokens=special), (text, special)
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(hf)) for _ in range(rng.randrange(1, 10))]
        assert fast.decode(ids) == hf.decode(ids, skip_special_tokens=False), ids
    assert fast.get_vocab() == hf.get_vocab() and len(fast) == len(hf)
    assert fast.eos_token_id == hf.eos_token_id and fast.special_tokens_map == hf.special_tokens_map
    assert fast.chat_template == hf.chat_template
    added = hf.backend_tokenizer.get_added_tokens_decoder()
    assert {i: repr(t) for i, t in fast.raw.get_added_tokens_decoder().items()} == {
        i: repr(t) for i, t in added.items()
    }
    return fast


def _saved(folder, raw, config: dict | None = None, **special):
    """`raw` (a `tokenizers.Tokenizer`) saved by transformers with these special tokens, its tokenizer_config.json
    then updated with `config` (None values delete a key)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=raw, **special)
    hf.chat_template = "{% for m in messages %}{{ bos_token }}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    hf.save_pretrained(str(folder))
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text()) | (config or {})
    path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    return folder


def _word_level():
    """Word-level, its special tokens in the vocabulary but not added tokens (transformers adds them)."""
    from tokenizers import Tokenizer as Raw
    from tokenizers import models, pre_tokenizers

    words = ["[UNK]", "[PAD]", "</s>", "hello", "world", "the", "quick", "I'm", "x"]
    raw = Raw(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return raw


def _metaspace():
    from tokenizers import Tokenizer as Raw
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = Raw(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    raw.decoder = decoders.Metaspace()
    raw.train_from_iterator(CORPUS, trainers.BpeTrainer(special_tokens=["<unk>", "<s>"], show_progress=False))
    return raw


def _byte_level(vocab_size: int = 400, specials=("<eos>",)):
    from tokenizers import Tokenizer as Raw
    from tokenizers import decoders, models, pre_tokenizers, trainers

    raw = Raw(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=alphabet, show_progress=False
    )
    raw.train_from_iterator(CORPUS, trainer)
    return raw


def test_fast_tokenizer_reads_folders_as_transformers_does(tmp_path, tiny_folder):
    assert_same_tokenizer(tiny_folder)
    assert_same_tokenizer(
        _saved(tmp_path / "word", _word_level(), unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    )
    meta = _saved(tmp_path / "meta", _metaspace(), unk_token="<unk>", bos_token="<s>")
    assert_same_tokenizer(meta)
    # a special token the tokenizer lacks (transformers adds it), and no post-processor in the file
    folder = _saved(tmp_path / "missing", _byte_level(), {"bos_token": "<s_new>"}, eos_token="<eos>")
    data = json.loads((folder / "tokenizer.json").read_text())
    (folder / "tokenizer.json").write_text(json.dumps(data | {"post_processor": None}))
    assert "<s_new>" in assert_same_tokenizer(folder).get_vocab()
    # transformers 4's config: the added tokens listed in it too
    folder = _saved(tmp_path / "v4", _byte_level(), eos_token="<eos>")
    data = json.loads((folder / "tokenizer.json").read_text())
    added = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in data["added_tokens"]}
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg | {"added_tokens_decoder": added}))
    assert_same_tokenizer(folder)


def test_fast_tokenizer_rebuilds_a_class_pipeline_as_transformers_does(tmp_path):
    """Qwen2Tokenizer and GemmaTokenizer rebuild the backend from the file's vocabulary and merges with their own
    normaliser, pre-tokenizer and decoder (Qwen2's adds NFC, which a GGUF's tokenizer.json lacks)."""
    from tokenizers import Regex, pre_tokenizers
    from tokenizers import Tokenizer as Raw

    from skipjack.loading.tokenizer import _QWEN2_SPLIT

    raw = json.loads(_byte_level(specials=("<|endoftext|>", "<|im_end|>")).to_str())
    raw["model"] |= {"continuing_subword_prefix": "", "end_of_word_suffix": ""}  # as Qwen2Tokenizer's BPE
    raw = Raw.from_str(json.dumps(raw))
    split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False)
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    folder = _saved(tmp_path / "qwen", raw, {"tokenizer_class": "Qwen2Tokenizer"}, eos_token="<|im_end|>")
    fast = assert_same_tokenizer(folder)
    assert fast.encode("e\u0301") == fast.encode("\u00e9")  # NFC
    folder = _saved(tmp_path / "qwen-defaults", raw, {"tokenizer_class": "Qwen2Tokenizer"})
    assert assert_same_tokenizer(folder).special_tokens_map["eos_token"] == "<|endoftext|>"  # the class's default


def test_fast_tokenizer_leaves_what_it_cannot_mirror_to_transformers(tmp_path):
    from skipjack.loading.tokenizer import load_tokenizer, read_fast

    cases = {
        "class": {"tokenizer_class": "LlamaTokenizer"},
        "bos": {"add_bos_token": True},
        "split": {"split_special_tokens": True},
        "named": {"image_token": "<image>"},
    }
    for name, config in cases.items():
        folder = _saved(tmp_path / name, _byte_level(), config, eos_token="<eos>")
        assert read_fast(folder) is None, name
        assert type(load_tokenizer(folder)).__module__.startswith("transformers"), name
    folder = _saved(tmp_path / "legacy", _byte_level(), eos_token="<eos>")
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<eos>"}))
    assert read_fast(folder) is None


TEMPLATES = [
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    # namespace, loop controls, tojson, a generation block, raise_exception (not raised), whitespace control
    """{%- set ns = namespace(n=0) -%}
{{ bos_token }}
{% for m in messages %}
    {% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}
    {% if loop.index > 5 %}{% break %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    {% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | tojson }}{% endgeneration %}
    {% else %}[{{ ns.n }}] {{ m['content'] | trim }} {{ m.get('reasoning_content', '') }}{{ dict(a=1)['a'] }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}{{ eos_token }}>{% endif %}""",
]


def test_chat_templates_render_as_in_transformers():
    from skipjack.loading.tokenizer import render_chat

    hf = byte_bpe_tokenizer()
    chats = [
        [{"role": "user", "content": "héllo 日本語"}],
        [
            {"role": "system", "content": "  be brief  "},
            {"role": "user", "content": 'say "hi" <b>'},
            {"role": "assistant", "content": "hi", "reasoning_content": "easy", "name": None},
            {"role": "user", "content": "again"},
        ],
    ]
    for template in TEMPLATES:
        for chat in chats:
            want = hf.apply_chat_template(chat, chat_template=template, tokenize=False, add_generation_prompt=True)
            assert render_chat(template, chat, hf.special_tokens_map) == want


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"])
def test_named_models_tokenize_as_in_transformers(name):
    """The named models' converted tokenizers (TokenizersBackend, GemmaTokenizer, Qwen2Tokenizer) read without
    transformers tokenize, and their chat templates render, exactly as transformers does them."""
    from transformers import AutoTokenizer

    from skipjack.loading.load import read_meta, source_folder
    from skipjack.loading.tokenizer import render_chat

    folder, _ = source_folder(name)
    fast = assert_same_tokenizer(folder)
    hf = AutoTokenizer.from_pretrained(str(folder))
    template = read_meta(folder).get("chat_template") or hf.chat_template
    chat = [{"role": "user", "content": "héllo 日本語 <eos>"}, {"role": "assistant", "content": " ok "}]
    chat.append({"role": "user", "content": "again"})
    want = hf.apply_chat_template(chat, chat_template=template, tokenize=False, add_generation_prompt=True)
    assert render_chat(template, chat, fast.special_tokens_map) == want
