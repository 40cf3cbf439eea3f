"""Read a GGUF file into an HF config dict and an HF-named state dict: fp32 (`read_tensors`), or with the
weights in their 4-/8-bit blocks as the file stores them (`read_blocks`).

Tensors are dequantised with the `gguf` package (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0, Q2_K..Q6_K, ...).
Config metadata is parsed by transformers' GGUF mapping; the tokenizer by transformers' GGUF converter.
llama.cpp stores Llama q/k weights with rows permuted for its RoPE layout and Gemma norms as (1 + w): both
are undone here so that the state dict matches the original HF checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from skipjack import schemas
from skipjack.errors import SkipjackError

_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def has_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def check_magic(path: Path) -> None:
    if not has_magic(path):
        raise SkipjackError(f"{path} is not a GGUF file (bad magic bytes)")


def read_config(path: Path) -> tuple[dict, dict]:
    """(HF config dict, tokenizer config dict incl. chat_template) from GGUF metadata."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    check_magic(path)
    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except ValueError as e:  # transformers: unsupported architecture
        raise SkipjackError(f"{path.name}: {e}") from None
    except Exception as e:  # truncated or corrupt metadata
        raise SkipjackError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from None
    tok_cfg = parsed.get("tokenizer_config") or {}
    schemas.parse(f"{path.name}'s tokenizer metadata", tok_cfg, schemas.TokenizerSettings)
    return parsed["config"], tok_cfg  # the config is checked by `normalise_config` (`schemas.HFConfig`)


# Per-layer tensors every supported family needs (GGUF names), and what each family adds.
_NEEDED = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
_EXTRA = {"gemma3_text": ("post_attention_norm", "post_ffw_norm", "attn_q_norm", "attn_k_norm")}


def check_tensors(path: Path, config: dict) -> None:
    """Refuse, from the header alone (nothing dequantised, nothing cached), a GGUF whose tensor list does not
    make the model its config describes: every name known, every layer's weights present, the embedding's
    shape right. `config`: the normalised HF config (its architecture is already known to be supported)."""
    reader = _reader(path)
    mt, layers = config["model_type"], config["num_hidden_layers"]
    shapes = {t.name: tuple(reversed([int(x) for x in t.shape])) for t in reader.tensors}
    for name in shapes:
        _hf_name(name, mt)  # an unknown tensor name is refused here
    wanted = ["token_embd.weight", "output_norm.weight"]  # no output.weight: the head is the embedding
    wanted += [f"blk.{i}.{part}.weight" for i in range(layers) for part in _NEEDED + _EXTRA.get(mt, ())]
    missing = [n for n in wanted if n not in shapes]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise SkipjackError(f"{path.name} is incomplete: tensor(s) {', '.join(missing[:3])}{more} missing")
    extra = sorted({int(n.split(".")[1]) for n in shapes if n.startswith("blk.")} - set(range(layers)))
    if extra:
        raise SkipjackError(f"{path.name} has tensors for layer {extra[0]}, but its metadata says {layers} layers")
    want = (config["vocab_size"], config["hidden_size"])
    if shapes["token_embd.weight"] != want:
        got = shapes["token_embd.weight"]
        raise SkipjackError(f"{path.name}: token_embd.weight has shape {got}, {want} expected from its metadata")


def _hf_name(name: str, model_type: str) -> str:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m:
        i, part, kind = m.groups()
        if part == "ffn_norm":
            hf = "pre_feedforward_layernorm" if model_type == "gemma3_text" else "post_attention_layernorm"
        else:
            hf = _LAYER.get(part)
        if hf is None:
            raise SkipjackError(f"unexpected GGUF tensor {name!r}")
        return f"model.layers.{i}.{hf}.{kind}"
    base, _, kind = name.rpartition(".")
    if base not in _TOP:
        raise SkipjackError(f"unexpected GGUF tensor {name!r}")
    return f"{_TOP[base]}.{kind}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: rows (h, 2, D/2) -> (h, D/2, 2) as in the HF checkpoint."""
    d = w.shape[0] // n_head // 2
    return w.reshape(n_head, d, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def read_tensors(path: Path, config: dict) -> dict[str, torch.Tensor]:
    """Dequantise every tensor to fp32 with HF names."""
    mt = config["model_type"]
    out = {}
    for t in _reader(path).tensors:
        shape = tuple(reversed([int(x) for x in t.shape]))
        out[_hf_name(t.name, mt)] = torch.from_numpy(_fixed(t, _dequantized(t), shape, mt, config))
    return out


def _reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:
        raise SkipjackError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}") from None


def read_blocks(path: Path, config: dict) -> dict:
    """HF-named tensors, the 2-D weights whose block type maps exactly onto a kernel format (`quant.EXACT`) as
    `QuantTensor`s holding the file's own values, every other tensor dequantised to fp32 (norms, biases, and
    weights of other types, which the weight format then quantises, saying so)."""
    from skipjack.weights.quant import EXACT, from_gguf

    mt = config["model_type"]
    out = {}
    for t in _reader(path).tensors:
        shape = tuple(reversed([int(x) for x in t.shape]))
        if len(shape) == 2 and t.tensor_type.name in EXACT:
            w = from_gguf(t.data, t.tensor_type.name, *shape)
            heads = _rope_heads(t.name, mt, config)
            if heads:
                w = w.rows(torch.from_numpy(_unpermute(np.arange(shape[0]), heads)))
        else:
            w = torch.from_numpy(_fixed(t, _dequantized(t), shape, mt, config))
        out[_hf_name(t.name, mt)] = w
    return out


def _dequantized(t) -> np.ndarray:
    from gguf import dequantize

    try:
        return dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise SkipjackError(f"GGUF tensor type {t.tensor_type.name} is not supported ({t.name})") from None


def _rope_heads(name: str, mt: str, config: dict) -> int:
    """The head count whose row permutation llama.cpp applied to this tensor (Llama q/k), else 0."""
    if mt in ("llama", "mistral") and ".attn_q." in name:
        return config["num_attention_heads"]
    if mt in ("llama", "mistral") and ".attn_k." in name:
        return config["num_key_value_heads"]
    return 0


def _fixed(t, w, shape, mt: str, config: dict) -> np.ndarray:
    """A dequantised tensor as the HF checkpoint holds it: q/k rows unpermuted, Gemma norms without the 1."""
    w = np.array(w, dtype=np.float32, copy=True).reshape(shape)
    heads = _rope_heads(t.name, mt, config)
    if heads:
        w = _unpermute(w, heads)
    if mt == "gemma3_text" and t.name.endswith("norm.weight"):
        w = w - 1.0
    return np.ascontiguousarray(w)


def read_tokenizer(path: Path):
    """The HF fast tokenizer that transformers builds from GGUF metadata."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise SkipjackError(f"cannot build a tokenizer from {path.name}: {type(e).__name__}: {e}") from None
