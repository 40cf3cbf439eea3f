"""The quality table and the speed/quality frontier from `skipjack eval` rows (`--out DIR`):
`python -m skipjack.bench.eval_report DIR` prints the table and writes DIR/frontier.png; BENCHMARKS.md gets
both through `benchmarks_md --eval DIR`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(folder: Path) -> list[dict]:
    out = []
    for p in sorted(folder.glob("*__*.json")):
        try:
            r = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(r, dict) and "perplexity" in r:
            out.append(r)
    return sorted(out, key=lambda r: (r["model"], r["method"] != "plain", r["method"], r["dtype"]))


def table(rs: list[dict]) -> str:
    md = [
        "| model | method | dtype | lossless | perplexity (Δ) | top-1 agree | KL | greedy identical | × plain "
        "(decoding) | task: method / plain | skipped |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rs:
        p, g, t, s = r["perplexity"], r["greedy"], r["task"], r.get("skipped") or {}
        task = "–" if t.get("name") in (None, "none") else f"{t['name']} {t['score']:.1%} / {t['score_plain']:.1%}"
        skipped = ", ".join(
            f"{k.replace('_skipped_share', '')} {v:.0%}" for k, v in s.items() if k.endswith("_share") and v
        )
        md.append(
            f"| {r['model']} | {r['method']} | {r['dtype']} | {'yes' if r['lossless'] else 'no'} | "
            f"{p['ppl']:.3f} ({p['ppl_increase']:+.1%}) | {p['top1_agreement']:.1%} | {p['kl']:.4f} | "
            f"{g['identical']}/{g['prompts']} | {g['speedup']:.2f} ({g['decode_speedup']:.2f}) | {task} | "
            f"{skipped or '–'} |"
        )
    return "\n".join(md) + "\n"


def frontier(rs: list[dict], path: Path) -> None:
    """Decoding speed over plain against perplexity increase, per model; one marker per method family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rs})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    marks = {"layer-skip": "s", "ffn-skip": "o", "skipdecode": "^", "plain": "*"}
    for ax, model in zip(axes[0], models):
        for r in (r for r in rs if r["model"] == model):
            fam = r["method"].split(":")[0]
            x, y = 100 * r["perplexity"]["ppl_increase"], r["greedy"]["decode_speedup"]
            ax.scatter(x, y, marker=marks.get(fam, "x"), label=fam)
            ax.annotate(r["method"].split(":", 1)[-1] if ":" in r["method"] else r["method"], (x, y), fontsize=7)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=8)
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set(xlabel="perplexity increase over plain (%)", ylabel="decoding speed × plain", title=model)
        ax.set_xscale("symlog", linthresh=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    folder = Path((argv or sys.argv[1:])[0])
    rs = rows(folder)
    if not rs:
        print(f"no eval rows under {folder}", file=sys.stderr)
        return 2
    print(table(rs))
    frontier(rs, folder / "frontier.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
