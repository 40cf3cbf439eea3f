"""Benchmark summary, REPORT.md, and the BENCHMARKS.md writer (`python -m skipjack.bench.report DIR --benchmarks-md F`).

results.json schema (version `SCHEMA_VERSION`; times in seconds, sizes in bytes unless the key says MB/GB):

    schema          int
    command         str: the exact `skipjack bench ...` command line (shell-quoted)
    complete        bool: false when interrupted (Ctrl-C); then runs/summary hold what was measured
    machine         {cpu, cores, physical_cores, threads, ram_gb, platform, python, torch, transformers,
                     llama_cpp_python (null if not installed), bandwidth_gbs (measured copy bandwidth),
                     load_avg_1m (at the start: other load on the machine skews timings), date (ISO)}
    model           {name, source, dtype, weight_bytes, params, context, load_seconds, load_cold_s, load_warm_s,
                     weight_bytes_by_dtype ({dtype: bytes} for the run's dtype and each `method@dtype`'s)}
    suite           "quick" | "full" | "custom" (--prompts); prompts_file: the path or null
    settings        {methods: [...], peers: [...], max_new_tokens, temperature, seed, repeats}
    prompts         [{id, category, prompt_tokens}]  the prompts that were run
    skipped         [{id, category, prompt_tokens, reason}]  prompts that do not fit the model's context
    peers           {name: {status: "ok" | "not installed" | "unavailable: ..." | "failed: ...", weight_bytes}}
    peak_rss_mb     float: the process's peak RSS (getrusage)
    runs[]          one per method/peer x prompt: {id, category, method, kind ("method" | "peer"), prompt_tokens,
                     new_tokens, seconds (median over repeats), seconds_all, tokens_per_s, prefill_seconds (median
                     time to the first token; null for peers), identical (bool: output
                     tokens == plain's on this prompt; null at T > 0), mean_accepted (tokens per decoding forward
                     pass), accept_hist ({accepted drafts per verify step: count}; {} for peers), draft_steps
                     (null for peers), forward_passes (decoding passes, prefill excluded), finish, tokens}
    summary         {method or peer: {kind, status, lossless (skipjack.drafters.LOSSLESS, and false for a
                     `method@dtype` in another dtype than the run's, whose reference `plain` it is not; null for
                     peers), prompts,
                     new_tokens, seconds, tokens_per_s (total tokens / total seconds), speedup_vs_plain,
                     speedup_vs_<peer> for each peer that ran (e.g. speedup_vs_hf, speedup_vs_hf-pld),
                     decode_tokens_per_s and decode_speedup_vs_plain (the decoding phase alone: tokens after the
                     first over seconds after the first token; null for peers, whose prefill time is not known),
                     mean_accepted, accept_hist, draft_steps, forward_passes, forward_passes_per_s,
                     identical_fraction (null at T > 0), identical_in_dtype (a `method@dtype`'s share of outputs
                     equal to `plain@dtype`'s; null without it), peak_rss_mb (sampled while it ran), weight_bytes,
                     bandwidth_utilisation (weight_bytes x forward passes/s / measured bandwidth),
                     by_category: {cat: {prompts, new_tokens, seconds, tokens_per_s, speedup_vs_plain, mean_accepted}}}}
                    A peer that did not run has only kind, status and null numbers.
    linear_rows     {ms: {rows: median ms of one pass over the model's packed linears with that many input rows,
                     unpadded}, ms_by_shape: {"INxOUT": the same per weight shape}, plain_ms_by_shape: {"INxOUT":
                     {rows: ms with the plain-layout weights (F.linear)}}, pads: {"INxOUT": [padded rows, or -1: plain,
                     for 0, 1, ... rows]}} (skipjack.bench.rows, skipjack.padding; older files: pad_rows, ms)
    cost_curves     [{context: [lo, hi or null], plain_steps, verify_steps, typical_context, t1_seconds,
                     cost: {n: c(n)}}] per context bucket: the verify-cost curves the shared cost model
                     (skipjack.cost) learned by the end of the run, read at typical_context; c(n) = seconds of a
                     forward over n new tokens / a plain step's at that context. Null when no speculative method
                     ran. (Absent in older files.)

A speedup is a ratio of tokens/s over the prompts both sides completed (all of them unless interrupted).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from skipjack.bench import loops

SCHEMA_VERSION = 1
PLOTS = ("speedup_by_category.png", "draft_length.png", "accept_hist.png")
RED = '<span style="color:red">{}</span>'


def _agg(runs: list[dict]) -> dict:
    tokens = sum(r["new_tokens"] for r in runs)
    secs = sum(r["seconds"] for r in runs)
    passes = sum(r["forward_passes"] for r in runs)
    weighted = sum(r["mean_accepted"] * r["forward_passes"] for r in runs)
    return {
        "prompts": len(runs),
        "new_tokens": tokens,
        "seconds": round(secs, 4),
        "tokens_per_s": tokens / secs if secs > 0 else None,
        "mean_accepted": weighted / passes if passes else (1.0 if runs else None),
        "forward_passes": passes,
    }


def _decode_rate(runs: list[dict]) -> float | None:
    """Tokens after the first over the seconds after the first token (prefill excluded)."""
    if not runs or any(r.get("prefill_seconds") is None for r in runs):
        return None
    secs = sum(r["seconds"] - r["prefill_seconds"] for r in runs)
    return sum(max(r["new_tokens"] - 1, 0) for r in runs) / secs if secs > 0 else None


def _ratio(a, b):
    return a / b if a and b else None


def _speedup(runs: list[dict], ref: list[dict], rate=lambda rs: _agg(rs)["tokens_per_s"]) -> float | None:
    """rate(runs) over rate(ref) (tokens/s by default), on the prompt ids both have."""
    common = {r["id"] for r in runs} & {r["id"] for r in ref}
    return _ratio(rate([r for r in runs if r["id"] in common]), rate([r for r in ref if r["id"] in common]))


def summarise(results: dict, rss_peaks: dict | None = None) -> dict:
    """The `summary` section, computed from `runs` (see the module docstring)."""
    from skipjack.bench.suite import split_dtype
    from skipjack.drafters import LOSSLESS, parse_method

    runs, peers = results.get("runs", []), results.get("peers", {})
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    plain = by.get("plain", [])
    ran_peers = [n for n, p in peers.items() if p["status"] == "ok" and by.get(n)]
    bw = (results.get("machine") or {}).get("bandwidth_gbs")
    greedy = results.get("settings", {}).get("temperature", 0) == 0
    model = results.get("model") or {}
    out: dict[str, dict] = {}
    for name in [*results.get("settings", {}).get("methods", []), *peers]:
        is_peer = name in peers
        status = peers[name]["status"] if is_peer else "ok"
        rs = by.get(name, [])
        s = {"kind": "peer" if is_peer else "method", "status": status}
        spec, dtype = split_dtype(name)  # `method@dtype`: the model in another dtype than the run's (and plain's)
        same_dtype = dtype in (None, model.get("dtype"))
        s["lossless"] = None if is_peer else same_dtype and parse_method(spec)[0] in LOSSLESS
        s |= _agg(rs) if rs else dict.fromkeys(("prompts", "new_tokens", "seconds", "tokens_per_s", "mean_accepted"))
        s["speedup_vs_plain"] = _speedup(rs, plain) if rs else None
        s["decode_tokens_per_s"] = _decode_rate(rs)
        s["decode_speedup_vs_plain"] = _speedup(rs, plain, _decode_rate) if rs else None
        for p in ran_peers:
            s[f"speedup_vs_{p}"] = _speedup(rs, by[p]) if rs else None
        hist: dict[str, int] = {}
        for r in rs:
            for k, v in r["accept_hist"].items():
                hist[str(k)] = hist.get(str(k), 0) + v
        s["accept_hist"] = dict(sorted(hist.items(), key=lambda kv: int(kv[0])))
        s["draft_steps"] = None if is_peer or not rs else sum(r["draft_steps"] for r in rs)
        marks = [r["identical"] for r in rs if r["identical"] is not None]
        s["identical_fraction"] = sum(marks) / len(marks) if greedy and marks else None
        own = {r["id"]: r["tokens"] for r in by.get(f"plain@{dtype}", [])} if spec != "plain" else {}
        pairs = [r["tokens"] == own[r["id"]] for r in rs if r["id"] in own and "tokens" in r]
        s["identical_in_dtype"] = sum(pairs) / len(pairs) if greedy and pairs else None
        s["peak_rss_mb"] = round(rss_peaks[name], 1) if rss_peaks and name in rss_peaks else None
        if is_peer:
            weights = peers[name].get("weight_bytes")
        else:
            weights = model.get("weight_bytes") if same_dtype else (model.get("weight_bytes_by_dtype") or {}).get(dtype)
        fps = s["forward_passes"] / s["seconds"] if rs and s["seconds"] else None
        s["forward_passes_per_s"] = fps
        s["weight_bytes"] = weights
        s["bandwidth_utilisation"] = weights * fps / (bw * 1e9) if weights and fps and bw else None
        cats: dict[str, dict] = {}
        for cat in dict.fromkeys(r["category"] for r in rs):
            cr = [r for r in rs if r["category"] == cat]
            c = _agg(cr)
            c["speedup_vs_plain"] = _speedup(cr, [r for r in plain if r["category"] == cat])
            cats[cat] = {k: c[k] for k in ("prompts", "new_tokens", "seconds", "tokens_per_s", "speedup_vs_plain")}
            cats[cat]["mean_accepted"] = c["mean_accepted"]
        s["by_category"] = cats
        out[name] = s
    return out


# ---- rendering ----


def _f(x, fmt: str = "{:.2f}", none: str = "–") -> str:
    return none if x is None else fmt.format(x)


def _padding_line(rows: dict) -> str:
    """How forwards were padded in the run: one rule for every shape, or per shape (`skipjack.padding`)."""
    if "pads" not in rows:  # older files: one row count for every layer
        return f"Forwards over fewer than {rows['pad_rows']} tokens are padded to {rows['pad_rows']} rows."
    rules = {s: ", ".join(f"{m}→{_pad(q)}" for m, q in enumerate(p) if q != m) for s, p in rows["pads"].items()}
    rules = {s: r or "none" for s, r in rules.items()}
    how = "rows → padded rows, or → plain: the weight's plain layout (F.linear)"
    if len(set(rules.values())) == 1:
        return f"Padding in use, every weight shape ({how}): {next(iter(rules.values()))}."
    per = "; ".join(f"{s}: {r}" for s, r in rules.items())
    return f"Padding in use per weight shape ({how}): {per}."


def _pad(q: int) -> str:
    from skipjack.models.common import PLAIN

    return "plain" if q == PLAIN else str(q)


def _lossy(s: dict) -> bool:
    """A skipjack method whose greedy output differs from plain's. Peers are not flagged: they run other
    arithmetic (llama.cpp multiplies the quantised weights directly), so their tokens may differ."""
    return s.get("kind") != "peer" and s.get("identical_fraction") is not None and s["identical_fraction"] < 1.0


def _label(name: str, s: dict) -> str:
    if _lossy(s):
        return RED.format(f"{name} — NOT IDENTICAL (lossy)")
    return name


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def _overall(summary: dict, peers: list[str]) -> str:
    head = ["method", "status", "lossless", "prompts", "new tokens", "seconds", "tokens/s", "× plain"]
    head += ["× plain (decode)"]
    head += [f"× {p}" for p in peers] + ["tokens/pass", "identical", "peak RSS MB", "BW util"]
    rows = []
    for name, s in summary.items():
        ident = _f(s["identical_fraction"], "{:.0%}")
        if _lossy(s):
            ident = RED.format(f"{s['identical_fraction']:.0%} NOT IDENTICAL")
        lossless = "–" if s["lossless"] is None else ("yes" if s["lossless"] else "no")
        row = [_label(name, s), s["status"], lossless, _f(s["prompts"], "{}"), _f(s["new_tokens"], "{}")]
        row += [_f(s["seconds"]), _f(s["tokens_per_s"], "{:.1f}"), _f(s["speedup_vs_plain"], "{:.2f}×")]
        row += [_f(s.get("decode_speedup_vs_plain"), "{:.2f}×")]
        row += [_f(s.get(f"speedup_vs_{p}"), "{:.2f}×") for p in peers]
        row += [_f(s["mean_accepted"]), ident, _f(s["peak_rss_mb"], "{:.0f}"), _f(s["bandwidth_utilisation"], "{:.1%}")]
        rows.append(row)
    return _table(head, rows)


def loop_split(results: dict) -> tuple[list[str], list[list[str]], str] | None:
    """A table (header, rows) of each lossless speculative method's speedup over plain on the prompts whose plain
    output is clean and on those where it loops (`skipjack.bench.loops`), and the paragraph that defines the
    split; None when the run has no greedy plain outputs or no such method."""
    prompts, looping = loops.looping_prompts(results)
    summary = results.get("summary", {})
    methods = [
        m for m, s in summary.items() if m != "plain" and s.get("kind") == "method" and s.get("identical_fraction") == 1
    ]
    if not prompts or not methods:
        return None
    by: dict[str, list[dict]] = {}
    for r in results.get("runs", []):
        by.setdefault(r["method"], []).append(r)
    rows = []
    for m in methods:
        cells = [f"`{m}`"]
        for group in (prompts - looping, looping):
            mine, ref = ([r for r in by.get(n, []) if r["id"] in group] for n in (m, "plain"))
            cells += [_f(_speedup(mine, ref), "{:.2f}×"), _f(_speedup(mine, ref, _decode_rate), "{:.2f}×")]
        rows.append(cells)
    head = ["method", f"× plain, clean ({len(prompts - looping)})", "× plain (decode), clean"]
    head += [f"× plain, looping ({len(looping)})", "× plain (decode), looping"]
    return head, rows, loops.explain(len(looping), len(prompts))


def render_quality(q: dict) -> str:
    """The markdown section for a `skipjack.bench.quality` result (quality.json)."""
    head = ["category", "texts", "tokens", "perplexity fp32", f"perplexity {q['dtype']}", "change"]
    head += ["top-1 agreement", "mean KL (nats)"]
    rows = [
        [cat, str(s["texts"]), str(s["tokens"]), f"{s['ppl_ref']:.3f}", f"{s['ppl_other']:.3f}"]
        + [f"{s['ppl_change']:+.2%}", f"{s['top1_agreement']:.2%}", f"{s['mean_kl']:.5f}"]
        for cat, s in [*q["by_category"].items(), ("**all**", q["overall"])]
    ]
    note = (
        "Teacher-forced over every prompt's tokens (chat template included): the model in fp32 against the same "
        f"weights in {q['dtype']}; top-1 agreement is the share of positions where both pick the same next token."
    )
    return f"Command: `{q['command']}`\n\n" + _table(head, rows) + "\n\n" + note


def _in_dtype(summary: dict) -> str:
    """A line on how `method@dtype` outputs compare with plain decoding in the same dtype ('' if none ran)."""
    shares = {n: s["identical_in_dtype"] for n, s in summary.items() if s.get("identical_in_dtype") is not None}
    if not shares:
        return ""
    each = ", ".join(f"`{n}` {v:.0%}" for n, v in shares.items())
    return (
        "Against plain decoding on the model in the same dtype (`plain@...`), share of identical outputs: "
        f"{each}. The `identical` column compares with `plain`, in the run's dtype."
    )


def _categories(summary: dict) -> list[str]:
    return list(dict.fromkeys(c for s in summary.values() for c in s.get("by_category") or {}))


def _by_category(summary: dict, key: str, fmt: str) -> str:
    cats = _categories(summary)
    rows = []
    for name, s in summary.items():
        if s["status"] != "ok" or not s["prompts"]:
            continue
        bc = s["by_category"]
        overall = s["speedup_vs_plain"] if key == "speedup_vs_plain" else s[key]
        rows.append([_label(name, s), *(_f(bc.get(c, {}).get(key), fmt) for c in cats), _f(overall, fmt)])
    return _table(["method", *cats, "overall"], rows)


def _acceptance(summary: dict) -> str:
    rows = []
    for name, s in summary.items():
        if s["status"] != "ok" or not s["prompts"]:
            continue
        hist = s["accept_hist"]
        steps = sum(hist.values())
        shown = ", ".join(f"{k}: {v / steps:.0%}" for k, v in hist.items()) if steps else "–"
        rows.append([_label(name, s), _f(s["mean_accepted"]), _f(s["draft_steps"], "{}"), shown])
    return _table(["method", "tokens per forward pass", "verify steps with a draft", "accepted drafts: share"], rows)


def _cost_curves(curves: list[dict]) -> str:
    """The cost model's learned curves, one row per context bucket."""
    ns = list(curves[0]["cost"])
    head = ["context (tokens)", "plain steps", "verify steps", "read at", "plain step (ms)", *(f"c({n})" for n in ns)]
    rows = []
    for c in curves:
        lo, hi = c["context"]
        span = f"{lo}–{hi}" if hi else f"> {lo - 1}"
        t1 = None if c["t1_seconds"] is None else c["t1_seconds"] * 1e3
        at = str(c.get("typical_context", "–"))
        rows.append([span, str(c["plain_steps"]), str(c["verify_steps"]), at, _f(t1, "{:.1f}")])
        rows[-1] += [_f(c["cost"][n]) for n in ns]
    notes = (
        "Learned by the shared cost model (`skipjack.cost`) from every timed decoding step of this run: c(n) is"
        " the time of one forward over n new tokens relative to a plain step at the same context, read at the"
        ' context in the "read at" column. Each starts from a prior measured at two contexts before the run;'
        " what a bucket learns on top of it carries over to the longer buckets."
    )
    return _table(head, rows) + "\n\n" + notes


def _check(label: str, got, want: float | None, how: str) -> list[str]:
    met = "–" if got is None or want is None else ("met" if got >= want else RED.format("missed"))
    return [label, _f(got, "{:.2f}×"), "–" if want is None else f"≥ {want:.2f}×", met, how]


def targets(summary: dict) -> str:
    """The issues' speed targets, checked against this run's numbers (rows whose methods did not run are left out)."""
    rows = []
    ok = {n: s for n, s in summary.items() if s["status"] == "ok" and s["prompts"]}
    cat = lambda n, c: ((ok.get(n) or {}).get("by_category") or {}).get(c, {}).get("tokens_per_s")  # noqa: E731
    if "plain" in ok and "hf" in ok:
        rows.append(_check("plain vs HF `generate` greedy", ok["plain"].get("speedup_vs_hf"), 1.5, "tokens/s ratio"))
    if "pld" in ok:
        rows.append(_check("pld vs our plain", ok["pld"]["speedup_vs_plain"], 1.5, "end to end (prefill included)"))
        rows.append(_check("pld vs our plain", ok["pld"].get("decode_speedup_vs_plain"), 1.5, "decoding phase only"))
        if "hf-pld" in ok:
            rows.append(_check("pld vs HF prompt lookup", ok["pld"].get("speedup_vs_hf-pld"), 1.3, "tokens/s ratio"))
    if "pld" in ok and "ngram" in ok:
        for c in ("chat", "math"):
            rows.append(_check(f"ngram vs pld, {c}", _ratio(cat("ngram", c), cat("pld", c)), 1.0, "category tokens/s"))
    for key, how in (("tokens_per_s", "tokens/s ratio"), ("decode_tokens_per_s", "decoding phase only")):
        fixed = {n: s.get(key) for n, s in ok.items() if n.startswith("pld:k=") and "@" not in n and s.get(key)}
        if "pld" in ok and fixed:
            best = max(fixed, key=fixed.get)
            got = _ratio(ok["pld"].get(key), fixed[best])
            rows.append(_check(f"pld (cost model) vs best fixed size ({best})", got, 1.0, how))
    if not rows:
        return ""
    return _table(["target", "measured", "wanted", "", "how"], rows)


def prefill_bound(results: dict, want: float = 1.5) -> str:
    """Where plain's time goes, and the decoding-phase speedup an end-to-end target of `want` needs: speculation
    leaves the prompt's forward pass as it is, so with plain's prefill time P of its total T, the target needs
    decoding (T - P) to shrink to T / want - P (impossible when that is <= 0). Empty without pld in the run."""
    if "pld" not in results.get("summary", {}):
        return ""
    runs = [r for r in results.get("runs", []) if r["method"] == "plain" and r.get("prefill_seconds") is not None]
    total, pre = sum(r["seconds"] for r in runs), sum(r["prefill_seconds"] for r in runs)
    if not runs or total <= 0:
        return ""
    left = total / want - pre
    needs = f"{(total - pre) / left:.2f}×" if left > 0 else "more than any decoding speedup can give"
    return (
        f"Plain spends {pre:.0f} of its {total:.0f} s ({pre / total:.0%}) on the prompts' forward passes, which "
        f"speculation does not change: {want:.1f}× end to end needs {needs} on the decoding phase."
    )


def headroom_line(h: dict) -> str:
    """The paragraph for a `skipjack.bench.headroom` result: what the best prompt-lookup drafter could reach."""
    return (
        "Best case for any prompt-lookup drafter (`skipjack.bench.headroom`): a copy oracle that always knows which "
        "span of the prompt and output so far the next greedy tokens repeat, drafts the length that minimises time "
        f"under this run's verify costs, and drafts for free would reach {h['decode_speedup']:.2f}× on the decoding "
        f"phase and {h['end_to_end_speedup']:.2f}× end to end, at {h['oracle_tokens_per_pass']:.2f} tokens per pass "
        f"({h['free_tokens_per_pass']:.2f} if verifying any number of tokens cost one plain step)."
    )


def render_markdown(
    results: dict, img_dir: str = ".", title: str = "skipjack benchmark report", headroom: dict | None = None
) -> str:
    m, model, st, summary = results["machine"], results["model"], results["settings"], results["summary"]
    peers = [n for n, s in summary.items() if s["kind"] == "peer" and s["status"] == "ok" and s["prompts"]]
    parts = [f"# {title}", ""]
    if not results["complete"]:
        parts += [RED.format("**Partial results: the run was interrupted (complete: false).**"), ""]
    parts += [
        f"- **Date:** {m['date']}",
        f"- **Machine:** {m['cpu']}, {m['cores']} cores ({m['threads']} threads used), {m['ram_gb']} GB RAM, "
        f"measured memory bandwidth {m['bandwidth_gbs']} GB/s, load average {m.get('load_avg_1m', '?')} at start; "
        f"torch {m['torch']}, transformers {m['transformers']}, "
        f"llama-cpp-python {m['llama_cpp_python'] or 'not installed'}",
        f"- **Model:** {model['name']} ({model['dtype']}, {model['params'] / 1e6:.1f}M parameters, "
        f"{model['weight_bytes'] / 1e6:.1f} MB of weights, context {model['context']}); load time: "
        f"cold {_f(model.get('load_cold_s'), '{:.1f}')} s (GGUF dequantised and converted into an empty cache), "
        f"warm {_f(model.get('load_warm_s'), '{:.1f}')} s (from the conversion cache)",
        f"- **Suite:** {results['suite']}, {len(results['prompts'])} prompts; max new tokens {st['max_new_tokens']}, "
        f"temperature {st['temperature']}, {st['repeats']} repeats (median kept), warm-up excluded",
        f"- **Command:** `{results['command']}`",
    ]
    rows = results.get("linear_rows") or {}
    if rows.get("ms"):
        times = ", ".join(f"{n}: {v:.1f}" for n, v in rows["ms"].items())
        parts += [
            f"- **Linear layers by input rows** (one pass over all packed linears, median ms, unpadded): {times}. "
            + _padding_line(rows)
        ]
    parts += [""]
    missing = {n: s["status"] for n, s in summary.items() if s["status"] != "ok"}
    if missing:
        parts += ["Peers that did not run: " + "; ".join(f"`{n}`: {why}" for n, why in missing.items()), ""]
    lossy = [n for n, s in summary.items() if _lossy(s)]
    if lossy:
        parts += [RED.format("**NOT IDENTICAL to plain greedy output (lossy): " + ", ".join(lossy) + "**"), ""]
    checks = targets(summary)
    if checks:
        bound = prefill_bound(results)
        parts += ["## Targets", "", checks, ""] + ([bound, ""] if bound else [])
        parts += [headroom_line(headroom), ""] if headroom else []
    split = loop_split(results)
    if split:
        parts += ["## Clean and looping outputs", "", _table(*split[:2]), "", split[2], ""]
    in_dtype = _in_dtype(summary)
    parts += ["## Overall", "", _overall(summary, peers), ""] + ([in_dtype, ""] if in_dtype else [])
    parts += ["tokens/s = total new tokens / total seconds; × X = ratio of tokens/s; tokens/pass = new tokens per "]
    parts += ["decoding forward pass; BW util = weight bytes × forward passes/s ÷ measured bandwidth;"]
    parts += ["× plain (decode) = the same ratio over the decoding phase only (after the first token; speculation"]
    parts += ["does not change the prompt's forward pass, which dominates the long-context prompts).", ""]
    parts += ["## Speedup vs plain by category", "", _by_category(summary, "speedup_vs_plain", "{:.2f}×"), ""]
    parts += ["## Tokens/s by category", "", _by_category(summary, "tokens_per_s", "{:.1f}"), ""]
    parts += ["## Acceptance", "", _acceptance(summary), ""]
    if results.get("cost_curves"):
        parts += ["## Verify cost", "", _cost_curves(results["cost_curves"]), ""]
    if results.get("skipped"):
        parts += ["## Skipped prompts", ""]
        parts += [f"- `{s['id']}` ({s['category']}): {s['reason']}" for s in results["skipped"]] + [""]
    parts += ["## Plots", ""]
    for png in PLOTS:
        parts += [f"![{png[:-4]}]({img_dir.rstrip('/')}/{png})", ""]
    return "\n".join(parts)


def summary_text(results: dict) -> str:
    """A short plain-text summary for the terminal."""
    lines = [f"{'method':<16} {'tok/s':>8} {'× plain':>8} {'tok/pass':>9} {'identical':>9}  status"]
    for name, s in results["summary"].items():
        ident = _f(s["identical_fraction"], "{:.0%}") + (" LOSSY" if _lossy(s) else "")
        lines.append(
            f"{name:<16} {_f(s['tokens_per_s'], '{:.1f}'):>8} {_f(s['speedup_vs_plain'], '{:.2f}x'):>8} "
            f"{_f(s['mean_accepted']):>9} {ident:>9}  {s['status']}"
        )
    if not results["complete"]:
        lines.append("(partial results: interrupted)")
    return "\n".join(lines)


def write_report(results: dict, out: Path) -> None:
    """REPORT.md and the PNG plots into `out`."""
    from skipjack.bench.plots import write_plots

    write_plots(results, Path(out))
    (Path(out) / "REPORT.md").write_text(render_markdown(results, headroom=_headroom(results, Path(out))) + "\n")


def _read(results_dir: Path) -> dict:
    from skipjack.errors import SkipjackError

    src = Path(results_dir) / "results.json"
    try:
        return json.loads(src.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SkipjackError(f"cannot read {src}: {e}") from None


def _headroom(results: dict, results_dir: Path) -> dict | None:
    """results_dir/headroom.json (`skipjack.bench.headroom`) if it was computed from this very run, else None."""
    try:
        h = json.loads((Path(results_dir) / "headroom.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if h.get("run_date") != results["machine"]["date"]:
        print(f"skipjack: ignoring {Path(results_dir) / 'headroom.json'}: computed from another run", file=sys.stderr)
        return None
    return h


def render_extra(results: dict, heading: str) -> str:
    """A second run (e.g. the draft-sizing sweep) as one more section: its command, targets and tables."""
    summary = results["summary"]
    peers = [n for n, s in summary.items() if s["kind"] == "peer" and s["status"] == "ok" and s["prompts"]]
    parts = [f"## {heading}", ""]
    if not results["complete"]:
        parts += [RED.format("**Partial results: the run was interrupted (complete: false).**"), ""]
    m = results["machine"]
    parts += [f"Separate run, {m['date']}, on {m['cpu']} ({m['cores']} cores): `{results['command']}`", ""]
    checks = targets(summary)
    bound = prefill_bound(results) if checks else ""
    parts += [checks, ""] if checks else []
    parts += [bound, ""] if bound else []
    in_dtype = _in_dtype(summary)
    parts += [_overall(summary, peers), ""] + ([in_dtype, ""] if in_dtype else [])
    parts += [_by_category(summary, "speedup_vs_plain", "{:.2f}×"), ""]
    split = loop_split(results)
    parts += [_table(*split[:2]), ""] if split else []  # the split is defined in the main run's section
    return "\n".join(parts)


def write_benchmarks_md(
    results_dir: Path,
    target: Path,
    extra: list[tuple[str, Path]] = (),
    notes: Path | None = None,
    quality: Path | None = None,
) -> Path:
    """BENCHMARKS.md at `target` from results_dir/results.json; plots are copied to docs/bench/ beside it.
    `extra` runs (heading, dir) are appended as sections, then the `quality` folder's quality.json
    (`skipjack.bench.quality`), then the hand-written `notes` file verbatim (notes must not type figures: every
    number in BENCHMARKS.md comes from a results.json or quality.json)."""
    from skipjack.errors import SkipjackError

    results = _read(results_dir)
    extras = [(h, _read(d)) for h, d in extra]
    try:
        q = json.loads((Path(quality) / "quality.json").read_text()) if quality else None
    except (OSError, json.JSONDecodeError) as e:
        raise SkipjackError(f"cannot read {Path(quality) / 'quality.json'}: {e}") from None
    try:
        note_text = Path(notes).read_text() if notes else ""
    except OSError as e:
        raise SkipjackError(f"cannot read notes {notes}: {e}") from None
    docs = target.parent / "docs" / "bench"
    docs.mkdir(parents=True, exist_ok=True)
    for png in PLOTS:
        if not (Path(results_dir) / png).exists():
            from skipjack.bench.plots import write_plots

            write_plots(results, Path(results_dir))
            break
    for png in PLOTS:
        shutil.copyfile(Path(results_dir) / png, docs / png)
    shutil.copyfile(Path(results_dir) / "results.json", docs / "results.json")  # the raw data, under version control
    headroom = _headroom(results, Path(results_dir))
    if headroom:
        shutil.copyfile(Path(results_dir) / "headroom.json", docs / "headroom.json")
    md = render_markdown(results, "docs/bench", "Benchmarks", headroom) + "\nRaw data: `docs/bench/results.json`.\n"
    for (heading, d), (_, res) in zip(extra, extras):
        raw = docs / f"results-{Path(d).resolve().name}.json"
        shutil.copyfile(Path(d) / "results.json", raw)
        md += "\n" + render_extra(res, heading) + f"\nRaw data: `docs/bench/{raw.name}`.\n"
    if q:
        shutil.copyfile(Path(quality) / "quality.json", docs / "quality.json")
        md += f"\n## Quality: {q['dtype']} against fp32 (separate run)\n\n" + render_quality(q)
        md += "\n\nRaw data: `docs/bench/quality.json`.\n"
    if note_text:
        md += "\n" + note_text.rstrip()
    target.write_text(md + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    from skipjack.errors import SkipjackError, run_command

    ap = argparse.ArgumentParser(prog="python -m skipjack.bench.report", description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="a `skipjack bench --out` folder holding results.json")
    ap.add_argument(
        "--benchmarks-md", default=None, help="write this BENCHMARKS.md (plots go to docs/bench/ beside it)"
    )
    ap.add_argument(
        "--extra", action="append", default=[], metavar="HEADING=DIR", help="append another run as a section"
    )
    ap.add_argument("--notes", default=None, help="append this hand-written markdown file (no typed figures)")
    ap.add_argument("--quality", default=None, help="append a `skipjack.bench.quality --out` folder's results")
    a = ap.parse_args(argv)

    def body() -> None:
        extra = []
        for item in a.extra:
            heading, eq, d = item.partition("=")
            if not eq or not heading or not d:
                raise SkipjackError(f"--extra wants HEADING=DIR (got {item!r})")
            extra.append((heading, Path(d)))
        if a.benchmarks_md:
            notes = Path(a.notes) if a.notes else None
            quality = Path(a.quality) if a.quality else None
            print(f"wrote {write_benchmarks_md(Path(a.dir), Path(a.benchmarks_md), extra, notes, quality)}")
        else:
            results = json.loads((Path(a.dir) / "results.json").read_text())
            write_report(results, Path(a.dir))
            print(f"wrote {Path(a.dir) / 'REPORT.md'}")

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
