"""The benchmark's PNG plots, drawn from a results.json dict with matplotlib's Agg backend.

- `speedup_by_category.png`: per category (and overall) one bar per method and peer: speedup vs plain
  (plain itself is the dashed line at 1).
- `draft_length.png`: tokens/s vs fixed draft length for the `pld:k=N` methods that ran, with the cost-model
  `pld` (and `plain`) as horizontal lines; without fixed-length runs, tokens/s vs tokens per pass per method.
- `accept_hist.png`: per drafting method, the share of verify steps that accepted 0, 1, 2, ... drafts.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _ran(summary: dict) -> dict:
    return {n: s for n, s in summary.items() if s["status"] == "ok" and s["prompts"]}


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def speedup_by_category(results: dict, path: Path) -> None:
    ran = {n: s for n, s in _ran(results["summary"]).items() if n != "plain"}  # plain is the dashed line at 1
    cats = list(dict.fromkeys(c for s in ran.values() for c in s["by_category"])) + ["overall"]
    fig, ax = plt.subplots(figsize=(min(14.0, max(7.0, 0.35 * len(cats) * max(1, len(ran)) + 2)), 4.8))
    if not ran:
        _note(ax, "nothing ran")
    else:
        width = 0.8 / len(ran)
        for i, (name, s) in enumerate(ran.items()):
            vals = [(s["by_category"].get(c) or {}).get("speedup_vs_plain") for c in cats[:-1]]
            vals.append(s["speedup_vs_plain"])
            xs = [j + (i - (len(ran) - 1) / 2) * width for j in range(len(cats))]
            hatch = "//" if s["kind"] == "peer" else None
            ax.bar(xs, [v or 0.0 for v in vals], width, label=name, hatch=hatch)
        ax.axhline(1.0, color="black", lw=0.8, ls="--", label="plain")
        ax.set_xticks(range(len(cats)), cats)
        ax.set_ylabel("speedup vs plain (tokens/s ratio)")
        ax.legend(fontsize=8, ncol=2)
    ax.set_title(f"Speedup by category — {results['model']['name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draft_length(results: dict, path: Path) -> None:
    ran = _ran(results["summary"])
    fixed = []
    for name, s in ran.items():
        base, _, opts = name.partition(":")
        if base == "pld" and opts.startswith("k=") and "," not in opts and opts[2:].isdigit() and int(opts[2:]) > 0:
            fixed.append((int(opts[2:]), s["tokens_per_s"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if fixed:
        fixed.sort()
        ax.plot([k for k, _ in fixed], [t for _, t in fixed], "o-", label="pld, fixed draft length k")
        ax.set_xscale("log", base=2)
        ax.set_xticks([k for k, _ in fixed], [str(k) for k, _ in fixed])
        for name, style in (("pld", "-"), ("plain", ":")):
            if name in ran:
                label = "pld (cost model)" if name == "pld" else "plain"
                ax.axhline(ran[name]["tokens_per_s"], ls=style, color="C1" if name == "pld" else "gray", label=label)
        ax.set_xlabel("draft length k")
        ax.set_ylabel("tokens/s")
        ax.set_title("Fixed draft length vs the cost model")
        ax.legend()
    elif ran:
        for name, s in ran.items():
            ax.scatter(s["tokens_per_pass"], s["tokens_per_s"], marker="s" if s["kind"] == "peer" else "o")
            ax.annotate(
                name, (s["tokens_per_pass"], s["tokens_per_s"]), fontsize=8, xytext=(4, 4), textcoords="offset points"
            )
        ax.set_xlabel("mean tokens per forward pass")
        ax.set_ylabel("tokens/s")
        ax.set_title("tokens/s vs accepted length (no pld:k=N runs)")
    else:
        _note(ax, "nothing ran")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def accept_hist(results: dict, path: Path) -> None:
    ran = {n: s for n, s in _ran(results["summary"]).items() if sum(s["accept_hist"].values())}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if not ran:
        _note(ax, "no drafting method ran (nothing was verified)")
    else:
        top = max(int(k) for s in ran.values() for k in s["accept_hist"])
        width = 0.8 / len(ran)
        for i, (name, s) in enumerate(ran.items()):
            total = sum(s["accept_hist"].values())
            ys = [s["accept_hist"].get(str(k), 0) / total for k in range(top + 1)]
            ax.bar([k + (i - (len(ran) - 1) / 2) * width for k in range(top + 1)], ys, width, label=name)
        ax.set_xlabel("accepted draft tokens per verify step")
        ax.set_ylabel("share of verify steps")
        ax.set_title("Acceptance-length histogram")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(results: dict, out: Path) -> list[Path]:
    paths = []
    for fn, name in (
        (speedup_by_category, "speedup_by_category.png"),
        (draft_length, "draft_length.png"),
        (accept_hist, "accept_hist.png"),
    ):
        fn(results, Path(out) / name)
        paths.append(Path(out) / name)
    return paths
