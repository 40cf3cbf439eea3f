"""The benchmark's numbers, computed from a run's `runs`: the `summary` section, speedups over groups of prompts,
the prefill bound, and the speed targets (`targets.json`) checked against a summary.

Nothing here formats text: `skipjack.bench.render` turns these numbers into REPORT.md.
"""

from __future__ import annotations

import json
from importlib import resources

from skipjack.bench.schema import MethodSummary, Results, Run

TARGETS_FILE = resources.files("skipjack.bench").joinpath("targets.json")


def _agg(runs: list[Run]) -> dict:
    tokens = sum(r["new_tokens"] for r in runs)
    secs = sum(r["seconds"] for r in runs)
    passes = sum(r["forward_passes"] for r in runs)
    weighted = sum(r["tokens_per_pass"] * r["forward_passes"] for r in runs)
    return {
        "prompts": len(runs),
        "new_tokens": tokens,
        "seconds": round(secs, 4),
        "tokens_per_s": tokens / secs if secs > 0 else None,
        "tokens_per_pass": weighted / passes if passes else (1.0 if runs else None),
        "forward_passes": passes,
    }


def decode_rate(runs: list[Run]) -> float | None:
    """Tokens after the first over the seconds after the first token (prefill excluded)."""
    if not runs or any(r.get("prefill_seconds") is None for r in runs):
        return None
    secs = sum(r["seconds"] - r["prefill_seconds"] for r in runs)
    return sum(max(r["new_tokens"] - 1, 0) for r in runs) / secs if secs > 0 else None


def prompt_rate(runs: list[Run]) -> float | None:
    """Prompt tokens over the seconds to the first token (the prompt's forward pass and the first pick)."""
    if not runs or any(r.get("prefill_seconds") is None for r in runs):
        return None
    secs = sum(r["prefill_seconds"] for r in runs)
    return sum(r["prompt_tokens"] for r in runs) / secs if secs > 0 else None


def ratio(a, b):
    return a / b if a and b else None


def speedup(runs: list[Run], ref: list[Run], rate=lambda rs: _agg(rs)["tokens_per_s"]) -> float | None:
    """rate(runs) over rate(ref) (tokens/s by default), on the prompt ids both have."""
    common = {r["id"] for r in runs} & {r["id"] for r in ref}
    return ratio(rate([r for r in runs if r["id"] in common]), rate([r for r in ref if r["id"] in common]))


def _by_method(results: Results) -> dict[str, list[Run]]:
    by: dict[str, list[Run]] = {}
    for r in results.get("runs", []):
        by.setdefault(r["method"], []).append(r)
    return by


def summarise(results: Results, rss_peaks: dict | None = None) -> dict[str, MethodSummary]:
    """The `summary` section, computed from `runs` (`skipjack.bench.schema.MethodSummary`)."""
    from skipjack.bench.suite import split_dtype
    from skipjack.methods import MethodSpec

    peers, by = results.get("peers", {}), _by_method(results)
    plain = by.get("plain", [])
    ran_peers = [n for n, p in peers.items() if p["status"] == "ok" and by.get(n)]
    greedy = results.get("settings", {}).get("temperature", 0) == 0
    model = results.get("model") or {}
    out: dict[str, dict] = {}
    for name in [*results.get("settings", {}).get("methods", []), *peers]:
        is_peer = name in peers
        rs = by.get(name, [])
        s = {"kind": "peer" if is_peer else "method", "status": peers[name]["status"] if is_peer else "ok"}
        spec, dtype = split_dtype(name)  # `method@dtype`: the model in another dtype than the run's (and plain's)
        same_dtype = dtype in (None, model.get("dtype"))
        s["lossless"] = None if is_peer else same_dtype and MethodSpec.parse(spec).lossless
        s |= _figures(rs, plain, greedy, is_peer)
        s["prompt_tokens_per_s"] = prompt_rate(rs)
        s["long_prompt_tokens_per_s"] = prompt_rate([r for r in rs if r.get("category") == "long"])
        for p in ran_peers:
            s[f"speedup_vs_{p}"] = speedup(rs, by[p]) if rs else None
        own = {r["id"]: r["tokens"] for r in by.get(f"plain@{dtype}", [])} if spec != "plain" else {}
        pairs = [r["tokens"] == own[r["id"]] for r in rs if r["id"] in own and "tokens" in r]
        s["identical_in_dtype"] = sum(pairs) / len(pairs) if greedy and pairs else None
        s["peak_rss_mb"] = round(rss_peaks[name], 1) if rss_peaks and name in rss_peaks else None
        if is_peer:
            weights = peers[name].get("weight_bytes")
        else:
            weights = model.get("weight_bytes") if same_dtype else (model.get("weight_bytes_by_dtype") or {}).get(dtype)
        _bandwidth(s, rs, weights, (results.get("machine") or {}).get("bandwidth_gbs"))
        s["by_category"] = _by_category(rs, plain)
        warm = [r["warm"] for r in rs if r.get("warm")]
        s["drafter"] = "cold" if warm else None  # the headline figures above: a fresh drafter on every prompt
        s["warm"] = {"drafter": "warm"} | _figures(warm, plain, greedy, False) if warm else None
        out[name] = s
    return out


def _figures(rs: list[Run], plain: list[Run], greedy: bool, is_peer: bool) -> dict:
    """A method's figures over its runs: totals, rates, speedups over plain, acceptance, identity."""
    s = _agg(rs) if rs else dict.fromkeys(("prompts", "new_tokens", "seconds", "tokens_per_s", "tokens_per_pass"))
    s["speedup_vs_plain"] = speedup(rs, plain) if rs else None
    s["decode_tokens_per_s"] = decode_rate(rs)
    s["decode_speedup_vs_plain"] = speedup(rs, plain, decode_rate) if rs else None
    hist: dict[str, int] = {}
    for r in rs:
        for k, v in r["accept_hist"].items():
            hist[str(k)] = hist.get(str(k), 0) + v
    s["accept_hist"] = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
    s["draft_steps"] = None if is_peer or not rs else sum(r["draft_steps"] for r in rs)
    drafting = [r.get("draft_seconds") for r in rs]
    s["draft_share"] = sum(drafting) / s["seconds"] if rs and None not in drafting and s["seconds"] else None
    marks = [r["identical"] for r in rs if r["identical"] is not None]
    s["identical_fraction"] = sum(marks) / len(marks) if greedy and marks else None
    return s


def _bandwidth(s: dict, rs: list[Run], weights: int | None, bw: float | None) -> None:
    """Forward passes/s, the weights read per pass, and the share of the measured bandwidth that makes."""
    fps = s["forward_passes"] / s["seconds"] if rs and s["seconds"] else None
    s["forward_passes_per_s"] = fps
    s["weight_bytes"] = weights
    s["bandwidth_utilisation"] = weights * fps / (bw * 1e9) if weights and fps and bw else None


def _by_category(rs: list[Run], plain: list[Run]) -> dict:
    cats: dict[str, dict] = {}
    for cat in dict.fromkeys(r["category"] for r in rs):
        cr = [r for r in rs if r["category"] == cat]
        c = _agg(cr)
        c["speedup_vs_plain"] = speedup(cr, [r for r in plain if r["category"] == cat])
        cats[cat] = {k: c[k] for k in ("prompts", "new_tokens", "seconds", "tokens_per_s", "speedup_vs_plain")}
        cats[cat]["tokens_per_pass"] = c["tokens_per_pass"]
    return cats


def group_speedups(results: Results, groups: list[set[str]]) -> dict[str, list[tuple[float | None, float | None]]]:
    """Each lossless speculative method's (speedup, decoding-phase speedup) over plain on each group of prompt
    ids (methods whose outputs all equal plain's; plain itself left out)."""
    summary = results.get("summary", {})
    methods = [
        m for m, s in summary.items() if m != "plain" and s.get("kind") == "method" and s.get("identical_fraction") == 1
    ]
    by = _by_method(results)
    out = {}
    for m in methods:
        out[m] = []
        for group in groups:
            mine, ref = ([r for r in by.get(n, []) if r["id"] in group] for n in (m, "plain"))
            out[m].append((speedup(mine, ref), speedup(mine, ref, decode_rate)))
    return out


def prefill_need(results: Results, want: float) -> dict | None:
    """Plain's prefill and total seconds, and the decoding-phase speedup an end-to-end target of `want` needs:
    speculation leaves the prompt's forward pass as it is, so with plain's prefill time P of its total T, the
    target needs decoding (T - P) to shrink to T / want - P (`needs` is None when that is <= 0, impossible).
    None without pld in the run or without plain's prefill times."""
    if "pld" not in results.get("summary", {}):
        return None
    runs = [r for r in results.get("runs", []) if r["method"] == "plain" and r.get("prefill_seconds") is not None]
    total, pre = sum(r["seconds"] for r in runs), sum(r["prefill_seconds"] for r in runs)
    if not runs or total <= 0:
        return None
    left = total / want - pre
    return {"prefill": pre, "total": total, "needs": (total - pre) / left if left > 0 else None}


def load_targets(path=None) -> list[dict]:
    """The targets listed in targets.json (or `path`), in the order they are reported."""
    return json.loads((path or TARGETS_FILE).read_text(encoding="utf-8"))["targets"]


def _best(ok: dict[str, dict], prefixes, value) -> str | None:
    """The method (no `@dtype`) whose name starts with one of `prefixes` and whose value is highest."""
    prefixes = [prefixes] if isinstance(prefixes, str) else prefixes
    have = {n: value(n) for n in ok if n.startswith(tuple(prefixes)) and "@" not in n and value(n)}
    return max(have, key=have.get) if have else None


def _measured(t: dict, ok: dict[str, dict]) -> tuple[str, float | None] | None:
    """(label, measured number) of one target, or None when a method it compares did not run."""

    def value(name: str) -> float | None:
        if "category" in t:
            return (ok[name].get("by_category") or {}).get(t["category"], {}).get(t["key"])
        return ok[name].get(t["key"])

    if "best_of" in t:  # the best of several methods stands for `method`
        t = t | {"method": _best(ok, t["best_of"], value)}
        if t["method"] is None:
            return None
    compared = [t["method"], *t.get("needs", []), *([t["over"]] if "over" in t else [])]
    if any(n not in ok for n in compared):
        return None

    label = t["label"].replace("{method}", t["method"])
    if "over" in t:
        return label, ratio(value(t["method"]), value(t["over"]))
    if "over_best" in t:
        best = _best(ok, t["over_best"], value)
        return None if best is None else (label.format(best=best), ratio(value(t["method"]), value(best)))
    return label, value(t["method"])


def check_targets(
    summary: dict[str, MethodSummary], targets: list[dict] | None = None, model: str | None = None
) -> list[dict]:
    """The speed targets (targets.json) measured on this run: [{label, got, want, how}]; targets whose methods
    did not run, or set for another `model` than the run's, are left out."""
    ok = {n: s for n, s in summary.items() if s["status"] == "ok" and s["prompts"]}
    rows = []
    for t in load_targets() if targets is None else targets:
        if t.get("model") not in (None, model):
            continue
        got = _measured(t, ok)
        if got is not None:
            rows.append({"label": got[0], "got": got[1], "want": t.get("want"), "how": t["how"]})
    return rows
