"""`skipjack inspect`: what each layer says.

- The logit lens (nostalgebraist, 2020; the view behind DEL's and SWIFT's early exits): one forward over the
  prompt returns every layer's hidden state; each goes through the final norm and the LM head
  (`DecoderLM.head`), which gives that layer's distribution at every position. Shown per layer: its top tokens
  at the last position, and, at every position, the rank and probability of the final layer's top token
  there (the "answer"). The last layer's projection is the model's own logits (a test checks it).
- Feature neurons read through the final projection ("decoding specialised feature neurons with the final
  projection layer"): an FFN neuron j of layer l writes its activation times the down projection's column
  W_down[:, j] into the residual stream. Through the final norm's weights g and the LM head's row u_t for a
  token t, that direction scores (u_t * g) . W_down[:, j] (the norm's 1 / rms is one positive scale for every
  direction, so it does not change the order). The neurons with the highest scores most promote t.

`lens` and `neurons` are the library; `command` prints text, `--json`, and `--png` draws a heat map (layers x
positions: the answer's probability under each layer). The layer probe (`bench.layers`) reads its per-layer
early-exit predictions from `lens`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from skipjack.errors import SkipjackError
from skipjack.weights.linear import QuantLinear, dense


@dataclass
class LayerView:
    layer: int
    top: list[tuple[int, float]]  # the last position's top tokens under this layer, with probabilities
    answer_rank: list[int]  # per position: the rank of the final layer's top token (0 = this layer's top too)
    answer_prob: list[float]  # per position: its probability under this layer
    argmax: list[int]  # per position: this layer's own top token


@dataclass
class Neuron:
    layer: int
    index: int
    score: float  # (u_t * g) . W_down[:, j]


@torch.inference_mode()
def lens(model, ids: list[int], top: int = 5) -> tuple[list[LayerView], torch.Tensor]:
    """Every layer's view of the prompt `ids`, and the model's own logits [T, V] from the same pass."""
    if not ids:
        raise SkipjackError("inspect needs a prompt of at least one token")
    out = model(torch.tensor([ids]), return_hidden=range(model.num_layers), logits="all")
    final = out.logits[0].float()  # [T, V]
    return views(model, out.hidden, final, top), final


@torch.inference_mode()
def views(model, hidden: dict[int, torch.Tensor], final: torch.Tensor, top: int = 5) -> list[LayerView]:
    """Each layer's view from its hidden states ({layer: [1, T, D]}) and the final logits [T, V]."""
    answer = final.argmax(-1)  # [T]
    out = []
    for i in sorted(hidden):
        logits = model.head(hidden[i])[0]  # [T, V]
        probs = torch.softmax(logits, -1)  # [T, V]
        mine = logits.gather(1, answer[:, None])  # [T, 1]
        p, t = probs[-1].topk(top)
        out.append(
            LayerView(
                i,
                list(zip(t.tolist(), p.tolist())),
                (logits > mine).sum(-1).tolist(),
                probs.gather(1, answer[:, None])[:, 0].tolist(),
                logits.argmax(-1).tolist(),
            )
        )
    return out


def agreement(layer_views: list[LayerView], answer: list[int]) -> list[float]:
    """Per layer, the share of positions whose top token is `answer`'s (an early exit's shadow acceptance)."""
    return [sum(a == b for a, b in zip(v.argmax, answer)) / max(1, len(answer)) for v in layer_views]


def _head_row(model, token: int) -> torch.Tensor:
    """The LM head's row for `token` [D], fp32."""
    head = model.lm_head
    if isinstance(head, QuantLinear):
        return head.weight().dequantize(torch.tensor([token]))[0]
    return dense(head)[token]


@torch.inference_mode()
def neurons(model, token: int, top: int = 10) -> list[Neuron]:
    """The FFN neurons (over every layer) whose output direction most promotes `token` through the final norm's
    weights and the LM head, best first."""
    vocab = model.lm_head.out_features
    if not 0 <= token < vocab:
        raise SkipjackError(f"token id {token} is not in [0, {vocab})")
    u = _head_row(model, token) * model.norm_weight.float()  # [D]
    found: list[Neuron] = []
    for i, layer in enumerate(model.layers):
        scores = u @ dense(layer.wd)  # [D] @ [D, I] -> [I]
        s, j = scores.topk(min(top, scores.numel()))
        found += [Neuron(i, int(a), float(b)) for a, b in zip(j.tolist(), s.tolist())]
    return sorted(found, key=lambda x: -x.score)[:top]


def heatmap(views: list[LayerView], pieces: list[str], path: Path) -> None:
    """Layers x positions: the probability of the final layer's top token under each layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [v.answer_prob for v in views]  # [L, T]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(pieces)), max(4, 0.25 * len(views))))
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1)
    ax.set(xlabel="position (input token)", ylabel="layer", title="P(final layer's top token) under each layer")
    ax.set_xticks(range(len(pieces)), [p[:10] for p in pieces], rotation=70, fontsize=7)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p) -> None:
    p.add_argument("prompt", help="the text to look into (sent as is, not through the chat template)")
    p.add_argument("--model", default=None, help="a named model, a GGUF or a checkpoint folder (default: smollm2-135m)")
    p.add_argument("--top", type=int, default=5, help="top tokens per layer (1-20)")
    p.add_argument("--token", default=None, help="also list the FFN neurons that most promote this token (text or id)")
    p.add_argument("--neurons", type=int, default=10, help="how many neurons to list (1-100)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--png", default=None, metavar="FILE", help="write the layers x positions heat map here")


def _token(tok, spec: str) -> int:
    """A token given as an id or as text that is exactly one token."""
    if spec.isdigit():
        return int(spec)
    ids = tok.encode(spec, add_special_tokens=False)
    if len(ids) != 1:
        raise SkipjackError(f"--token {spec!r} is {len(ids)} tokens; give one token's text or its id")
    return ids[0]


def command(a) -> int:
    from skipjack import validate
    from skipjack.loading.load import load

    top = validate.integer("--top", a.top, 1, 20)
    count = validate.integer("--neurons", a.neurons, 1, 100)
    text = validate.text("the prompt", a.prompt, empty=False)
    png = validate.writable_file("--png", validate.path("--png", a.png)) if a.png else None
    loaded = load(a.model)
    model, tok = loaded.model, loaded.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    ctx = model.config.max_position_embeddings
    if not ids or len(ids) > min(ctx, 2048):
        raise SkipjackError(f"the prompt has {len(ids)} tokens: inspect takes 1 to {min(ctx, 2048)}")
    token = _token(tok, a.token) if a.token is not None else None
    views, _ = lens(model, ids, top)
    found = neurons(model, token, count) if token is not None else []
    pieces = [tok.decode([i]) for i in ids]
    if png is not None:
        heatmap(views, pieces, png)
    if a.json:
        print(json.dumps(_json(views, found, ids, pieces, tok, token)))
        return 0
    _print(views, found, ids, pieces, tok, token)
    return 0


def _json(views, found, ids, pieces, tok, token) -> dict:
    return {
        "tokens": ids,
        "pieces": pieces,
        "answer": views[-1].argmax,
        "layers": [asdict(v) | {"top_text": [tok.decode([t]) for t, _ in v.top]} for v in views],
        "token": token,
        "neurons": [asdict(n) for n in found],
    }


def _print(views, found, ids, pieces, tok, token) -> None:
    ans = views[-1].argmax[-1]
    print(f"{len(ids)} tokens; the model's next token: {tok.decode([ans])!r} (id {ans})")
    print("layer | rank of that token | its probability | the layer's top tokens at the last position")
    for v in views:
        tops = ", ".join(f"{tok.decode([t])!r} {p:.2f}" for t, p in v.top)
        print(f"{v.layer:5d} | {v.answer_rank[-1]:18d} | {v.answer_prob[-1]:15.3f} | {tops}")
    if found:
        print(f"FFN neurons that most promote {tok.decode([token])!r} (id {token}): layer.neuron score")
        print("  " + ", ".join(f"{n.layer}.{n.index} {n.score:.3f}" for n in found))
