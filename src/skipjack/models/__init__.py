"""Model families, keyed by HF `model_type`. Each family file exports a config dataclass and `Model`."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch

from skipjack import schemas
from skipjack.errors import SkipjackError
from skipjack.models import gemma3, llama
from skipjack.models.common import DecoderLM, ForwardOut
from skipjack.weights.linear import FORMATS, default_format

FAMILIES = {
    "llama": (llama.LlamaConfig, llama.Model),
    "mistral": (llama.LlamaConfig, llama.Model),
    "qwen2": (llama.LlamaConfig, llama.Model),
    "gemma3_text": (gemma3.Gemma3Config, gemma3.Model),
}


# The sizes every family reads: checked as given (`schemas.HFConfig`) and as completed, so that a damaged config
# is one line, not a failure deep in the build.
_SIZES = schemas.MODEL_SIZES.split()


def normalise_config(d: dict) -> dict:
    """An HF config dict completed as transformers' config class for its `model_type` would complete it (the
    family's `normalise`: defaults, derived fields, RoPE parameters), without importing transformers. Keys skipjack
    does not read pass through; the keys it reads are checked first (`schemas.HFConfig`: a JSON list, a size
    that is not a positive integer or a RoPE section that is not an object is one line, not a TypeError)."""
    schemas.parse("the model config", d, schemas.HFConfig)
    mt = d.get("model_type")
    if mt == "gemma3":  # a multimodal Gemma 3 config: take its text part
        d = {**d.get("text_config", {}), "model_type": "gemma3_text"}
        mt = "gemma3_text"
    if mt not in FAMILIES:
        raise SkipjackError(f"unknown architecture {mt!r}; supported: {', '.join(sorted(FAMILIES))}")
    d = FAMILIES[mt][0].normalise({k: v for k, v in d.items() if k != "transformers_version"} | {"model_type": mt})
    _check_sizes({k: d.get(k) for k in _SIZES})
    if d["num_attention_heads"] % d["num_key_value_heads"]:
        raise SkipjackError(
            f"the model config's num_attention_heads ({d['num_attention_heads']}) is not a multiple of its "
            f"num_key_value_heads ({d['num_key_value_heads']})"
        )
    if d.get("layer_types") is not None:  # transformers' legacy name
        d["layer_types"] = ["full_attention" if t == "attention" else t for t in d["layer_types"]]
    return d


def _check_sizes(sizes: dict) -> None:
    for key, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise SkipjackError(f"the model config's {key} must be a positive integer (got {v!r})")


def build_model(
    config: dict, state_dict: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32, weights: str | None = None
) -> DecoderLM:
    """Instantiate our implementation from an HF config dict and an HF-named state dict, every linear layer in
    the weight format `weights` (`skipjack.weights.linear.FORMATS`; default: the best one for the dtype here)."""
    d = normalise_config(config)
    cfg_cls, model_cls = FAMILIES[d["model_type"]]
    cfg = cfg_cls.from_hf(d)
    sd = {k: v.to(dtype) for k, v in state_dict.items()}  # block weights (QuantTensor) keep their format
    fmt = weights or default_format(dtype)
    if fmt not in FORMATS:
        raise SkipjackError(f"unknown weight format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    try:
        model = model_cls(cfg, sd, FORMATS[fmt])
    except KeyError as e:
        raise SkipjackError(f"weights are missing tensor {e.args[0]!r} for a {d['model_type']} model") from None
    model.weights = fmt
    return model.eval()


def fingerprint(model: DecoderLM, precision: bool = True) -> str:
    """Identifies a model's weights and precision: its config, dtype, and the bytes of its first embedding rows
    and final norm (two different checkpoints of one architecture differ there). `precision=False`: the
    weights whatever their precision (values rounded to 2 significant digits; the dtype left out)."""
    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(model.config), sort_keys=True, default=str).encode())
    if precision:
        h.update(f"{model.dtype} {model.weights}".encode())
    for t in (model.embedding(torch.arange(min(64, model.embedding.num_embeddings))), model.norm_weight):
        t = t.detach().float().contiguous()
        if not precision:
            t = torch.tensor([float(f"{x:.2g}") for x in t.flatten().tolist()])
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:32]


__all__ = ["FAMILIES", "DecoderLM", "ForwardOut", "build_model", "fingerprint", "normalise_config"]
