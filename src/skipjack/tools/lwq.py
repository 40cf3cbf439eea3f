"""Layer-wise Quantization (Dumitru et al. 2024, "Layer-Wise Quantization: A Pragmatic and Effective Method for
Quantizing LLMs Beyond Integer Bit-Levels"): the more important layers keep the higher precision, so any
average bit width between two formats is reachable.

1. Importance, on calibration text (`vocab.local_text`, not the eval harness's text), one of two scores:
   - `lim` (layer input modification): 1 - cos(input, output) of the layer's hidden states, averaged over
     tokens: a layer that barely changes its input matters less;
   - `zd` (z-score distribution): the share of the layer's weights whose z-score (per tensor) exceeds 1:
     more outlier-heavy weights matter more.
2. Allocation: layers sorted most important first; the first k layers get the high format (q8) and the rest
   the low one (q4), k the largest count whose parameter-weighted average of the nominal bits (4 and 8) stays
   within the target. `order=random` (seeded) and `order=reverse` allocate the same way from another order:
   the paper's controls, at the same size.
3. The artefact: a converted entry like a GGUF's (config, tokenizer, block weights, sealed metadata) under
   `SKIPJACK_HOME/converted/`, its linears in q4 or q8 blocks layer by layer; `--model PATH` loads it (as q4:
   each block keeps its format). Only the blocks' linear layers change; embeddings, norms and the LM head are
   the source's.

Per tensor: high is exact for a block source (q4 blocks promote exactly to q8) and the closest q8 for a dense
one; low keeps a source's own q4 blocks, and quantises anything else (dense, or a GGUF's 6-bit tensors) to q4
(per-32 min/max). So on an all-4-bit GGUF (SmolLM2's Q4_1) there is nothing to gain: every layer is already
q4; on Qwen2.5-Coder's Q4_K_M the layers' 6-bit tensors are what the allocation keeps or rounds down.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from skipjack import integrity, store
from skipjack.errors import SkipjackError
from skipjack.store import home
from skipjack.weights import quant
from skipjack.weights.quant import QuantTensor

BITS = {"q4": 4.0, "q8": 8.0}
ORDERS = ("importance", "random", "reverse")
SCORES = ("lim", "zd")
KEY = "lwq"  # the artefact's section of the entry's metadata


def layer_params(state: dict, num_layers: int) -> list[int]:
    """Parameters of each layer's linear weights."""
    out = [0] * num_layers
    for name, w in state.items():
        i = _layer(name)
        if i is not None and i < num_layers:
            out[i] += w.shape[0] * w.shape[1]
    return out


def _layer(name: str) -> int | None:
    """The layer of a linear weight's name (`model.layers.{i}.*_proj.weight`), else None."""
    parts = name.split(".")
    if len(parts) >= 5 and parts[:2] == ["model", "layers"] and parts[-1] == "weight" and parts[-2].endswith("_proj"):
        return int(parts[2])
    return None


@torch.inference_mode()
def lim_scores(model, windows: list[list[int]]) -> list[float]:
    """1 - cos(input, output) per layer, averaged over every token of the windows."""
    L, tot, n = model.num_layers, torch.zeros(model.num_layers, dtype=torch.float64), 0
    for ids in windows:
        x = torch.tensor([ids])
        out = model(x, return_hidden=range(L), logits="none")
        before = [model.embed(x)] + [out.hidden[i] for i in range(L - 1)]  # [1, T, D] each
        for i in range(L):
            cos = torch.nn.functional.cosine_similarity(before[i].float(), out.hidden[i].float(), dim=-1)  # [1, T]
            tot[i] += float((1 - cos).sum())
        n += len(ids)
    return (tot / max(1, n)).tolist()


def zd_scores(state: dict, num_layers: int) -> list[float]:
    """Per layer: the share of its linear weights whose z-score within their tensor exceeds 1."""
    hits, total = [0.0] * num_layers, [0] * num_layers
    for name, w in state.items():
        i = _layer(name)
        if i is None or i >= num_layers:
            continue
        d = (w.dequantize() if isinstance(w, QuantTensor) else w).float()
        z = (d - d.mean()) / d.std().clamp_min(1e-12)
        hits[i] += float((z.abs() > 1).sum())
        total[i] += d.numel()
    return [h / max(1, t) for h, t in zip(hits, total)]


def allocate(order: list[int], params: list[int], bits: float) -> set[int]:
    """The layers in the high format: the first k of `order`, k the largest whose average stays <= bits."""
    lo, hi, P = BITS["q4"], BITS["q8"], sum(params)
    high, spent = set(), lo * P
    for i in order:
        if (spent + (hi - lo) * params[i]) / P > bits + 1e-9:
            break
        high.add(i)
        spent += (hi - lo) * params[i]
    return high


def ranking(scores: list[float], order: str, seed: int = 0) -> list[int]:
    """Layers most important first (`importance`), least important first (`reverse`), or shuffled (`random`)."""
    by = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if order == "reverse":
        return by[::-1]
    if order == "random":
        random.Random(seed).shuffle(by)
    return by


def tiered(w, high: bool):
    """A linear weight in the high (q8) or low (q4) format (see the module doc)."""
    if not isinstance(w, QuantTensor):
        return quant.quantize(w, "q8" if high else "q4") if w.shape[1] % 32 == 0 else w
    if high:
        return w.to_q8()
    return w if w.kind == "q4" else quant.quantize(w.dequantize(), "q4", f"{w.source} requantised to q4")


def check_bits(bits) -> float:
    ok = isinstance(bits, (int, float)) and not isinstance(bits, bool) and BITS["q4"] <= bits <= BITS["q8"]
    if not ok:
        raise SkipjackError(
            f"--bits must be a number from {BITS['q4']:g} (all q4) to {BITS['q8']:g} (all q8); got {bits!r}"
        )
    return float(bits)


def write(source: Path, config: dict, state: dict, tokenizer_dir: Path, meta: dict, name: str) -> Path:
    """Seal the artefact under SKIPJACK_HOME/converted/`name` (replacing an older one of that name)."""
    from safetensors.torch import save_file

    from skipjack.loading.load import FORMAT_VERSION, META

    entry = home() / "converted" / name
    with store.atomic_folder(entry, replace=True) as tmp:
        tensors, index = quant.flatten(state)
        save_file(tensors, str(tmp / "blocks.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        for f in tokenizer_dir.iterdir():
            if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
                shutil.copyfile(f, tmp / f.name)
        full = {"format": FORMAT_VERSION, "source": str(source), "weights": "blocks", "blocks": index} | meta
        integrity.seal(tmp, META, full)
    return entry


def calibration(tokenizer, tokens: int, width: int = 256) -> list[list[int]]:
    """Windows of local text (the drafters' training text, not the eval harness's) for the `lim` score."""
    from skipjack.vocab import local_text

    ids = tokenizer.encode(local_text(tokens * 8), add_special_tokens=False)
    step = max(width, len(ids) // max(1, tokens // width))
    return [ids[i : i + width] for i in range(0, len(ids), step) if len(ids[i : i + width]) == width][: tokens // width]


def quantize(spec: str, bits, order: str = "importance", score: str = "lim", seed: int = 0, tokens: int = 4096):
    """Write the artefact for model `spec` at `bits` average bits; returns (its folder, its `lwq` section)."""
    from skipjack.loading import load as loading
    from skipjack.models import normalise_config

    bits = check_bits(bits)
    if order not in ORDERS:
        raise SkipjackError(f"--order must be one of {', '.join(ORDERS)} (got {order!r})")
    if score not in SCORES:
        raise SkipjackError(f"--score must be one of {', '.join(SCORES)} (got {score!r})")
    folder, source = loading.source_folder(spec)
    meta = loading.read_meta(folder)
    if KEY in meta:
        raise SkipjackError(f"{spec} is already a layer-wise quantization artefact: quantize its source instead")
    config = loading.read_config(folder)
    L = normalise_config(dict(config))["num_hidden_layers"]
    flat = loading.read_weights(folder)
    state = quant.unflatten(flat, meta["blocks"]) if meta.get("blocks") else flat
    params = layer_params(state, L)
    if score == "lim":
        loaded = loading.load(spec, "q4" if meta.get("blocks") else "fp32")
        width = min(256, loaded.model.config.max_position_embeddings)
        scores = lim_scores(loaded.model, calibration(loaded.tokenizer, tokens, width))
    else:
        scores = zd_scores(state, L)
    high = allocate(ranking(scores, order, seed), params, bits)
    new = {k: (tiered(v, _layer(k) in high) if _layer(k) is not None else v) for k, v in state.items()}
    P = sum(params)
    info = {
        "bits": bits,
        "average_bits": (BITS["q4"] * P + (BITS["q8"] - BITS["q4"]) * sum(params[i] for i in high)) / P,
        "order": order,
        "score": score,
        "seed": seed,
        "scores": scores,
        "high": sorted(high),
        "source": str(source),
    }
    name = f"{folder.name.removesuffix('-blocks')}-lwq-{bits:g}-{order}-{score}"
    entry = write(source, config, new, folder, {"chat_template": meta.get("chat_template"), KEY: info}, name)
    return entry, info


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="a named model, a GGUF or a checkpoint folder (default: smollm2-135m)")
    p.add_argument("--bits", type=float, required=True, help="average bits per layer weight, from 4 (all q4) to 8")
    p.add_argument("--order", default="importance", help="importance | random | reverse (the paper's controls)")
    p.add_argument("--score", default="lim", help="lim (1 - cos of a layer's input and output) | zd (weight outliers)")
    p.add_argument("--seed", type=int, default=0, help="for --order random")


def command(a) -> int:
    entry, info = quantize(a.model, a.bits, a.order, a.score, a.seed)
    print(
        f"wrote {entry}: {len(info['high'])} layers in q8 ({', '.join(map(str, info['high'])) or 'none'}), the rest "
        f"q4; {info['average_bits']:.2f} average bits (order {info['order']}, score {info['score']})"
    )
    print(f"use it with: --model {entry}")
    return 0
