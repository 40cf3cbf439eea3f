"""Tokenizers live at the edges: text <-> ids, chat templates, and incremental detokenization.

A model folder's tokenizer is read with the `tokenizers` library alone (`FastTokenizer`) where its files fully
describe what transformers' `AutoTokenizer` builds from them; any other folder goes through transformers (slower to
import, the same tokenizer). Chat templates are rendered here with jinja2 in the environment transformers'
`apply_chat_template` renders them in (`render_chat`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path

from skipjack import schemas, validate

_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "</s>", "<eos>")
NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_EXTRA = ("extra_special_tokens", "additional_special_tokens")
# tokenizer_config.json keys that change nothing a `FastTokenizer` does (the named special tokens aside)
_INERT = {"backend", "tokenizer_class", "model_max_length", "is_local", "local_files_only", "name_or_path"}
_INERT |= {"padding_side", "truncation_side", "model_input_names", "chat_template", "add_prefix_space"}
_INERT |= {"clean_up_tokenization_spaces", "split_special_tokens", "added_tokens_decoder", *NAMED, *_EXTRA}
# Qwen2Tokenizer's pre-tokenizer pattern (transformers 5, `models/qwen2/tokenization_qwen2.py`)
_QWEN2_SPLIT = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


class Tokenizer:
    """Wraps an HF fast tokenizer (a `FastTokenizer`, or transformers' own) with the model's chat template and its
    set of stop ids."""

    def __init__(self, hf, chat_template: str | None, eos_token_id=None):
        self.hf = hf
        if isinstance(chat_template, dict):  # a folder with several named templates: the default one
            chat_template = chat_template.get("default")
        self.chat_template = chat_template
        eos = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
        ids = {i for i in eos if i is not None}
        if hf.eos_token_id is not None:
            ids.add(hf.eos_token_id)
        vocab = hf.get_vocab()
        ids |= {vocab[t] for t in _END_OF_TURN if t in vocab and (chat_template or "").find(t) >= 0}
        self.stop_ids = frozenset(ids)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def prompt_ids(self, prompt: str | list[dict], raw: bool = False, tools: list[dict] | None = None) -> list[int]:
        """Token ids for a prompt: a string (through the chat template as one user message unless `raw`),
        or a list of chat messages (`tools`: function definitions the template renders)."""
        if isinstance(prompt, str):
            validate.text("the prompt", prompt, empty=False)
            if raw or not self.chat_template:
                return self.encode(prompt)
            prompt = [{"role": "user", "content": prompt}]
        validate.messages(prompt)
        if not self.chat_template:
            return self.encode("\n\n".join(m["content"] or "" for m in prompt))
        text = render_chat(self.chat_template, prompt, getattr(self.hf, "special_tokens_map", {}), tools=tools)
        return self.encode(text, add_special_tokens=False)


class FastTokenizer:
    """The part of a transformers fast tokenizer that skipjack uses, on a `tokenizers.Tokenizer` alone: encode,
    decode, the vocabulary (added tokens included), the named special tokens, the chat template."""

    def __init__(self, raw, special_tokens_map: dict[str, str], chat_template: str | None = None):
        self.raw = raw
        self.special_tokens_map = special_tokens_map  # {"eos_token": "<eos>", ...}: chat templates see these
        self.chat_template = chat_template

    @property
    def eos_token_id(self) -> int | None:
        eos = self.special_tokens_map.get("eos_token")
        return None if eos is None else self.raw.token_to_id(eos)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.raw.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.raw.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        return self.raw.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.raw.get_vocab_size(with_added_tokens=True)


def load_tokenizer(folder: Path):
    """The tokenizer of an HF folder: a `FastTokenizer` where `read_fast` can read it, else transformers'."""
    fast = read_fast(folder)
    if fast is not None:
        return fast
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


@dataclass(frozen=True)
class _Class:
    """What transformers' tokenizer class of this name (transformers 5) does beyond reading tokenizer.json:
    the special tokens it defaults to, and for a class that rebuilds the backend from the file's vocabulary and
    merges, the pipeline it builds (`None`: the file's own)."""

    defaults: dict = field(default_factory=dict)
    pipeline: object = None  # (config, special tokens) -> an empty `tokenizers.Tokenizer` as the class builds it


def _gemma(cfg: dict, special: dict):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    bpe = models.BPE(vocab={}, merges=[], fuse_unk=True, unk_token=str(special.get("unk_token")), byte_fallback=True)
    t = Tokenizer(bpe)
    t.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    t.normalizer = normalizers.Replace(" ", "▁")
    return t


def _qwen2(cfg: dict, special: dict):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    t = Tokenizer(models.BPE(vocab={}, merges=[], continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    t.decoder = decoders.ByteLevel()
    t.normalizer = normalizers.NFC()
    split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(cfg.get("add_prefix_space")), use_regex=False)
    t.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    return t


_CLASSES = {
    "TokenizersBackend": _Class(),
    "PreTrainedTokenizerFast": _Class(),
    "GemmaTokenizer": _Class(
        dict(unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", mask_token="<mask>"), _gemma
    ),
    "Qwen2Tokenizer": _Class(
        dict(unk_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"), _qwen2
    ),
}


def _model(t) -> list:
    """A backend's model settings (its vocabulary and merges left out)."""
    names = ("dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk", "byte_fallback")
    return [type(t.model).__name__] + [getattr(t.model, a, None) for a in (*names, "ignore_merges")]


def _parts(t) -> list:
    """A backend's normalizer, pre-tokenizer and decoder, as their JSON."""
    return [None if p is None else json.loads(p.__getstate__()) for p in (t.normalizer, t.pre_tokenizer, t.decoder)]


def _token(d: dict):
    from tokenizers import AddedToken

    keys = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
    return AddedToken(**{k: d[k] for k in keys if k in d}) if isinstance(d, dict) and "content" in d else None


def _same(a, b) -> bool:
    keys = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def read_fast(folder: Path) -> FastTokenizer | None:
    """The folder's tokenizer read with `tokenizers` alone, as transformers' AutoTokenizer (transformers 5) builds
    it, or None where that is not certain (`_settings`; a tokenizer.json with truncation or padding, a model whose
    settings differ from what its class builds)."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Raw

    settings = _settings(folder)
    if settings is None:
        return None
    cfg, kind, special, extra, template = settings
    try:
        raw = Raw.from_file(str(folder / "tokenizer.json"))
    except Exception:
        return None  # transformers says what is wrong with it
    if raw.truncation is not None or raw.padding is not None:
        return None
    if cfg.get("clean_up_tokenization_spaces") and type(raw.model).__name__ != "BPE":
        return None  # transformers would clean up spaces after decoding
    have = raw.get_added_tokens_decoder()
    if kind.pipeline is not None:  # the class rebuilds the backend: the file's vocabulary and merges, its pipeline
        built = kind.pipeline(cfg, special)
        if _model(raw) != _model(built):
            return None
        if _parts(raw) != _parts(built):
            if any(t.normalized for t in have.values()):
                return None  # added tokens matched on normalised text: leave that to transformers
            raw.normalizer, raw.pre_tokenizer, raw.decoder = built.normalizer, built.pre_tokenizer, built.decoder
    for i, d in (cfg.get("added_tokens_decoder") or {}).items():  # must be the file's (else transformers adds them)
        t = _token(d)
        if t is None or not str(i).isdigit() or int(i) not in have or not _same(have[int(i)], t):
            return None
    if raw.post_processor is None:  # transformers then sets an empty template (no special tokens around a text)
        from tokenizers import processors

        raw.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    # TokenizersBackend.__init__: the special tokens the backend lacks are added (as special tokens)
    present = {t.content for t in have.values()}
    missing = [t for t in dict.fromkeys([*special.values(), *extra]) if t not in present]
    if missing:
        raw.add_tokens([AddedToken(t, special=True) for t in missing])
    raw.encode_special_tokens = False
    return FastTokenizer(raw, special, template)


def _settings(folder: Path):
    """(config, class, named special tokens, extra special tokens, chat template) from tokenizer_config.json and
    chat_template.jinja, or None for what `read_fast` leaves to transformers: no tokenizer.json, a tokenizer class
    not in `_CLASSES`, config keys that change tokenization (`_INERT` are those that do not), legacy
    special-token files, special tokens that are not plain strings, several chat templates."""
    path = folder / "tokenizer_config.json"
    if not ((folder / "tokenizer.json").is_file() and path.is_file()) or (folder / "chat_templates").exists():
        return None
    cfg = schemas.read_cache(path, dict)  # unreadable or not an object: left to transformers, which says why
    if cfg is None or cfg.get("tokenizer_class") not in _CLASSES or set(cfg) - _INERT:
        return None
    kind = _CLASSES[cfg["tokenizer_class"]]
    decoder = cfg.get("added_tokens_decoder")
    if decoder is None and any((folder / f).exists() for f in ("special_tokens_map.json", "added_tokens.json")):
        return None  # transformers would read these too
    extra = cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") or []
    special = {k: cfg.get(k, kind.defaults.get(k)) for k in NAMED}
    special = {k: v for k, v in special.items() if v is not None}
    template = cfg.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (
        cfg.get("split_special_tokens")
        or not isinstance(extra, list)
        or not all(isinstance(v, str) for v in [*special.values(), *extra])
        or not isinstance(template, str | None)
        or not isinstance(decoder, dict | None)
    ):
        return None
    return cfg, kind, special, extra, template


def render_chat(
    template: str, messages: list[dict], special: dict, add_generation_prompt: bool = True, tools=None
) -> str:
    """Chat messages through a chat template, as transformers' `apply_chat_template(..., tokenize=False)` renders
    them: keys whose value is None dropped, a message's reasoning also under `thinking` and `reasoning_content`,
    the named special tokens (`bos_token`, ...) as variables."""
    chat = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if k in m), None)
        chat.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    return _compiled(template).render(
        messages=chat, tools=tools, documents=None, add_generation_prompt=add_generation_prompt, **special
    )


@lru_cache
def _compiled(template: str):
    """transformers' chat template environment (`utils/chat_template_utils.py`): sandboxed, trim_blocks and
    lstrip_blocks, loop controls, `{% generation %}` blocks (rendered as they are), `raise_exception`,
    `strftime_now`, a `tojson` that keeps non-ASCII text, and a `dict` and `namespace` without attribute tricks."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, dict=TemplateDict(), namespace=Namespace)
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class StreamDecoder:
    """Incremental detokenization that never splits a multi-byte character and keeps leading spaces.

    Text is decoded with a few tokens of left context (so SentencePiece-style leading spaces survive) and
    emitted only up to the last complete character (a trailing U+FFFD means an unfinished byte sequence).
    """

    def __init__(self, tokenizer: Tokenizer, context: list[int] = (), n_context: int = 4):
        self.tok = tokenizer
        self.ctx = list(context)[-n_context:]
        self.prefix = tokenizer.decode(self.ctx)
        self.ids: list[int] = []
        self.text = ""  # emitted so far

    def push(self, ids) -> str:
        """Add generated ids; return the newly completed text."""
        self.ids.extend(ids)
        full = self.tok.decode(self.ctx + self.ids)[len(self.prefix) :]
        if full.endswith("\ufffd"):
            return ""
        delta, self.text = full[len(self.text) :], full
        return delta

    def flush(self) -> str:
        full = self.tok.decode(self.ctx + self.ids)[len(self.prefix) :]
        delta, self.text = full[len(self.text) :], full
        return delta
