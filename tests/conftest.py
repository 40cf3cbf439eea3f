"""Shared fixtures: tiny random models built from HF config classes (2-3 layers, hidden 32-64)."""

from __future__ import annotations

import contextlib
import os
import re
from importlib import resources
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The C++ kernels are built once, under the usual home, for every test (and every child process they start),
# whatever temporary SKIPJACK_HOME a test sets: a fresh home would build them again (a minute each).
os.environ.setdefault("SKIPJACK_KERNELS", os.path.join(os.path.expanduser("~"), ".cache", "skipjack", "kernels"))


@pytest.fixture(autouse=True)
def _torch_threads():
    """A test that pins torch to one thread (the χ² tests do, for speed on tiny tensors) gives the others back
    their threads: later tests on real models would run single-threaded."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# "-sw": sliding-window attention over 5 positions (Mistral on every layer; Qwen2 above max_window_layers)
FAMILIES = ("llama", "qwen2", "mistral", "gemma3_text", "mistral-sw", "qwen2-sw")


def hf_config(family: str, vocab: int = 96, **kw):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    common.update(kw)
    if family == "llama":
        return LlamaConfig(**common, rope_theta=500.0)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen2-sw":
        return Qwen2Config(**common, use_sliding_window=True, sliding_window=5, max_window_layers=1)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if family == "mistral-sw":
        return MistralConfig(**common, sliding_window=5)
    if family == "gemma3_text":
        common.setdefault("num_hidden_layers", 3)
        common["num_hidden_layers"] = max(common["num_hidden_layers"], 3)
        n = common["num_hidden_layers"]
        types = ["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(n)]
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=6, layer_types=types, query_pre_attn_scalar=16)
    raise ValueError(family)


def hf_model(family: str, seed: int = 0, dtype=torch.float32, **kw):
    """A random HF model whose every weight (norms and biases too) is random, so parity tests see all paths."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(family, **kw)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if family == "gemma3_text" else 1.0))
            else:
                p.copy_(torch.randn_like(p) * 0.15)
    return model.to(dtype)


def ours_from_hf(hf, dtype=torch.float32, weights: str | None = None):
    """Our model from an HF one; `weights` "q4" / "q8": every linear quantised to blocks (fp32 compute)."""
    from skipjack.models import build_model

    return build_model(hf.config.to_dict(), hf.state_dict(), dtype, weights)


@pytest.fixture(scope="session")
def tiny_llama64():
    """fp64 tiny Llama (ours) for exact identity tests: fp64 makes batched vs single-token logits agree."""
    return ours_from_hf(hf_model("llama", seed=1, vocab=48, num_hidden_layers=2), torch.float64)


@pytest.fixture(scope="session")
def tiny_gemma64():
    return ours_from_hf(hf_model("gemma3_text", seed=2, vocab=48), torch.float64)


@pytest.fixture(scope="session")
def tiny_llama_q4():
    """The same tiny Llama with q4 weights: its forward is batch-invariant (bit-identical rows), not fp64."""
    return ours_from_hf(hf_model("llama", seed=1, vocab=48, num_hidden_layers=2), weights="q4")


@pytest.fixture(scope="session")
def tiny_gemma_q4():
    return ours_from_hf(hf_model("gemma3_text", seed=2, vocab=48), weights="q4")


@pytest.fixture(scope="session")
def sliding_gemma64():
    """fp64 tiny Gemma 3 (window 6) with room for caches long enough to get sliding layers that evict
    (`make_cache` gives local layers a sliding cache only when the request is > window + 256 positions)."""
    return ours_from_hf(hf_model("gemma3_text", seed=2, vocab=48, max_position_embeddings=1024), torch.float64)


CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world this is a tiny tokenizer for tests",
    "def add ( a , b ) : return a + b",
    "héllo wörld 日本語 🙂 naïve café",
    "stop here please and then continue",
]


def byte_bpe_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a few lines (multi-byte characters span several tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    return fast


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """An HF model folder (config.json, model.safetensors, tokenizer) with a tiny random Llama."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = byte_bpe_tokenizer()
    model = hf_model("llama", seed=3, vocab=len(tok), max_position_embeddings=96)
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@contextlib.contextmanager
def tiny_engine(home, layers: int = 2, max_position_embeddings: int = 2048, seed: int = 3):
    """A q4 tiny Llama with the byte-level test tokenizer behind an `Engine`, its cache folder `home` (set for the
    duration)."""
    from skipjack.engine import Engine
    from skipjack.loading.load import Loaded
    from skipjack.loading.tokenizer import Tokenizer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SKIPJACK_HOME", str(home))
        tok = byte_bpe_tokenizer()
        hf = hf_model(
            "llama",
            seed=seed,
            vocab=len(tok),
            num_hidden_layers=layers,
            max_position_embeddings=max_position_embeddings,
        )
        m = ours_from_hf(hf, weights="q4")
        yield Engine(Loaded(m, Tokenizer(tok, tok.chat_template, tok.eos_token_id), "llama", None, 0, False))


CHAT = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


def make_tiny_model(folder: Path) -> Path:
    """A random 2-layer Llama plus a word-level tokenizer (with [UNK]) saved as an HF folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    text = resources.files("skipjack.bench").joinpath("prompts", "quick.jsonl").read_text(encoding="utf-8")
    words = sorted(set(re.findall(r"\w+|[^\w\s]", text)))[:3000]
    specials = ["[UNK]", "[PAD]", "</s>", "user", "assistant", ":"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(specials + words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    hf.chat_template = CHAT
    hf.save_pretrained(str(folder))
    torch.manual_seed(0)
    cfg = hf_config("llama", vocab=len(vocab), intermediate_size=128, max_position_embeddings=8192)
    cfg.eos_token_id, cfg.bos_token_id, cfg.pad_token_id = vocab["</s>"], None, vocab["[PAD]"]
    cfg.tie_word_embeddings = False
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    return folder
