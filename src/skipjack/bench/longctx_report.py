"""The long-context runs' report (`skipjack.bench.longctx`): runs merged, the summary relative to the full cache
(accuracy, speed, perplexity, memory), the issue's targets against what was measured, the markdown table and
the plots (accuracy against budget, latency against context)."""

from __future__ import annotations

from pathlib import Path

FULL = "full"


def merge(runs: list[dict]) -> dict:
    """Several runs' rows in one result (a later run's rows replace an earlier run's for the same setting)."""
    out = {k: runs[-1][k] for k in ("model", "dtype", "machine")}
    out["commands"] = [
        c for r in runs for c in r.get("commands") or [r.get("command", "python -m skipjack.bench.longctx")]
    ]
    parts = {
        "accuracy": ("length", "policy", "budget", "kind", "haystack", "seed"),
        "speed": ("length", "policy", "budget", "method"),
        "memory": ("length", "policy", "budget"),
        "perplexity": ("length", "policy", "budget"),
    }
    for part, keys in parts.items():
        rows: dict = {}
        for r in runs:
            seen: dict = {}
            for row in r.get(part, []):
                k = tuple(row[f] for f in keys)
                seen.setdefault(k, []).append(row)
            rows.update(seen)
        out[part] = [row for group in rows.values() for row in group]
    out["summary"] = summary(out)
    return out


def targets(res: dict) -> str:
    """The issue's targets against what was measured (empty cells: not measured)."""
    s = res["summary"]

    def get(length, policy, budget, field):
        return (s.get(f"{length}|{policy}|{budget}") or {}).get(field)

    acc = {p: [v.get("relative_accuracy") for k, v in s.items() if k.split("|")[1:] == [p, "0.1"]]
           for p in ("cake", "snapkv", "streaming", "actqkv")}  # fmt: skip
    mean = {p: (sum(x for x in v if x is not None) / len([x for x in v if x is not None])) if any(
        x is not None for x in v) else None for p, v in acc.items()}  # fmt: skip
    longest = max((int(k.split("|")[0]) for k in s if s[k].get("speedup")), default=None)
    policies = ("snapkv", "streaming", "h2o", "cake", "pyramidkv", "actqkv", "tidal")
    fast = {p: get(longest, p, 0.1, "speedup") for p in policies}
    tri = get(longest, FULL, "triforce", "speedup")

    def f(v, fmt):
        return "not measured" if v is None else fmt.format(v)

    best = max((v for v in fast.values() if v), default=None)
    lines = ["| target | measured |", "|---|---|"]
    lines.append(f"| CAKE at a 10% budget keeps ≥ 90% of full-cache accuracy | {f(mean['cake'], '{:.0%}')} |")
    beats = mean["cake"] is not None and mean["cake"] > max(mean["snapkv"] or 0, mean["streaming"] or 0)
    lines.append(
        f"| ... and beats SnapKV ({f(mean['snapkv'], '{:.0%}')}) and StreamingLLM ({f(mean['streaming'], '{:.0%}')}) "
        f"| {'yes' if beats else 'no'} |"
    )
    if mean["actqkv"] is not None:
        ge = mean["cake"] is not None and mean["actqkv"] >= mean["cake"]
        lines.append(f"| ActQKV at a 10% budget ({f(mean['actqkv'], '{:.0%}')}) keeps at least CAKE's accuracy "
                     f"| {'yes' if ge else 'no'} |")  # fmt: skip
    if longest is None:
        lines.append("| speed (a 10% budget ≥ 1.5×; triforce ≥ 1.3×) | not measured in these runs |")
        return "\n".join(lines) + "\n"
    lines.append(f"| a 10% budget decodes ≥ 1.5× the full cache at {longest} tokens | best {f(best, '{:.2f}×')} "
                 f"({', '.join(f'{p} {v:.2f}×' for p, v in fast.items() if v)}) |")  # fmt: skip
    lines.append(f"| triforce ≥ 1.3× plain at {longest} tokens | {f(tri, '{:.2f}×')} |")
    return "\n".join(lines) + "\n"


def summary(res: dict) -> dict:
    """Accuracy relative to the full cache, speed relative to it, perplexity change: per (length, policy, budget)."""
    out: dict = {}

    def key(r):
        return f"{r['length']}|{r['policy']}|{r['budget']}"

    acc: dict = {}
    for r in res.get("accuracy", []):
        acc.setdefault(key(r), []).append(r["score"])
    for k, v in acc.items():
        length = k.split("|")[0]
        full = acc.get(f"{length}|{FULL}|None")
        mean, ref = sum(v) / len(v), (sum(full) / len(full) if full else None)
        out.setdefault(k, {})["accuracy"] = round(mean, 4)
        out[k]["relative_accuracy"] = round(mean / ref, 4) if ref else None
    plain = {}
    for r in res.get("speed", []):
        if r["policy"] == FULL and r["method"] == "plain":
            plain.setdefault(r["length"], []).append(r["decode_tok_s"])
    for r in res.get("speed", []):
        k = key(r) if r["method"] == "plain" else f"{r['length']}|{FULL}|{r['method']}"
        ref = plain.get(r["length"])
        base = sum(ref) / len(ref) if ref else None
        row = out.setdefault(k, {})
        row.update({f: r[f] for f in ("decode_tok_s", "prefill_s", "kv_mb", "request_peak_mb")})
        if r["policy"] == FULL and r["method"] == "plain" and base:  # the reference: its runs' mean
            row["decode_tok_s"] = round(base, 3)
        row["speedup"] = round(row["decode_tok_s"] / base, 3) if base and row["decode_tok_s"] else None
    for r in res.get("memory", []):
        out.setdefault(key(r), {}).update({"peak_rss_mb": r["hwm_mb"], "kv_mb": r["kv_mb"]})
    ppl = {key(r): r["ppl"] for r in res.get("perplexity", [])}
    for k, v in ppl.items():
        full = ppl.get(f"{k.split('|')[0]}|{FULL}|None")
        out.setdefault(k, {})["ppl"] = v
        out[k]["ppl_change"] = round(v / full - 1, 4) if full else None
    return out


def markdown(res: dict) -> str:
    s = res["summary"]
    head = (
        "| context | policy | budget | accuracy (rel. to full) | ppl change | decode tok/s (× full) | prompt s "
        "| KV MB | peak RSS MB (own process) |"
    )
    lines = [head, "|" + "---|" * 9]

    def f(v, fmt="{:.2f}"):
        return "" if v is None else fmt.format(v)

    for k, r in sorted(s.items(), key=lambda kv: (int(kv[0].split("|")[0]), kv[0])):
        length, policy, budget = k.split("|")
        acc = f"{f(r.get('accuracy'))} ({f(r.get('relative_accuracy'), '{:.0%}')})" if "accuracy" in r else ""
        speed = f"{f(r.get('decode_tok_s'))} ({f(r.get('speedup'), '{:.2f}×')})" if r.get("decode_tok_s") else ""
        ppl, kv = f(r.get("ppl_change"), "{:+.1%}"), f(r.get("kv_mb"), "{:.1f}")
        budget = "" if budget == "None" else budget
        rss, pre = f(r.get("peak_rss_mb"), "{:.0f}"), f(r.get("prefill_s"))
        lines.append(f"| {length} | {policy} | {budget} | {acc} | {ppl} | {speed} | {pre} | {kv} | {rss} |")
    return "\n".join(lines) + "\n"


def plots(res: dict, out: Path, prefix: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = res["summary"]
    rows = [(k.split("|"), v) for k, v in s.items()]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy in sorted({p for (_, p, b), _ in rows if b != "None"}):
        pts = {}
        for (_, p, b), v in rows:
            if p == policy and b != "None" and v.get("relative_accuracy") is not None:
                pts.setdefault(float(b), []).append(v["relative_accuracy"])
        if pts:
            xs = sorted(pts)
            ax.plot(xs, [sum(pts[x]) / len(pts[x]) for x in xs], marker="o", label=policy)
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.set(xscale="log", xlabel="budget (kept fraction of the context)", ylabel="accuracy relative to the full cache")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{prefix}accuracy_vs_budget.png", dpi=110)
    plt.close(fig)
    if not res.get("speed"):
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict = {}
    for (length, p, b), v in rows:
        if v.get("decode_tok_s"):
            label = p if b == "None" else f"{p} {b}"
            series.setdefault(label, []).append((int(length), 1000 / v["decode_tok_s"]))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    ax.set(xlabel="context (tokens)", ylabel="ms per decoded token")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / f"{prefix}latency_vs_context.png", dpi=110)
    plt.close(fig)
