"""Tokenizers live at the edges: text <-> ids, chat templates, and incremental detokenization."""

from __future__ import annotations

from skipjack import validate

_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>", "</s>", "<eos>")


class Tokenizer:
    """Wraps an HF fast tokenizer with the model's chat template and its set of stop ids."""

    def __init__(self, hf, chat_template: str | None, eos_token_id=None):
        self.hf = hf
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

    def prompt_ids(self, prompt: str | list[dict], raw: bool = False) -> list[int]:
        """Token ids for a prompt: a string (through the chat template as one user message unless `raw`),
        or a list of chat messages."""
        if isinstance(prompt, str):
            validate.text("the prompt", prompt, empty=False)
            if raw or not self.chat_template:
                return self.encode(prompt)
            prompt = [{"role": "user", "content": prompt}]
        validate.messages(prompt)
        if not self.chat_template:
            return self.encode("\n\n".join(m["content"] for m in prompt))
        text = self.hf.apply_chat_template(
            prompt, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )
        return self.encode(text, add_special_tokens=False)


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
