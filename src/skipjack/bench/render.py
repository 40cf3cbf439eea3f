"""REPORT.md from a run's results (`skipjack.bench.schema.Results`): its header, targets and tables as markdown,
plus the terminal summary and the pieces BENCHMARKS.md reuses (`skipjack.bench.benchmarks_md`).

Pure text: the numbers come from the results and `skipjack.bench.summary`; nothing here reads or writes files.
Sections computed by an analysis tool (the copy oracle's bound, the clean/looping split) are passed in.
"""

from __future__ import annotations

import json

from skipjack.bench import summary as numbers
from skipjack.bench.schema import CostCurve, LinearRows, MethodSummary, Results

PLOTS = ("speedup_by_category.png", "draft_length.png", "accept_hist.png")
RED = '<span style="color:red">{}</span>'


def fmt(x, form: str = "{:.2f}", none: str = "–") -> str:
    """A number as a table cell (`form` a format string); `none` for a missing one."""
    return none if x is None else form.format(x)


def _padding_line(rows: LinearRows) -> str:
    """How forwards were padded in the run: one rule for every shape, or per shape (`skipjack.decoding.tuning`)."""
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
    from skipjack.weights.linear import PLAIN

    return "plain" if q == PLAIN else str(q)


def lossy(s: MethodSummary) -> bool:
    """A skipjack method whose greedy output differs from plain's. Peers are not flagged: they run other
    arithmetic (llama.cpp multiplies the quantised weights directly), so their tokens may differ."""
    return s.get("kind") != "peer" and s.get("identical_fraction") is not None and s["identical_fraction"] < 1.0


def _label(name: str, s: MethodSummary) -> str:
    if lossy(s):
        return RED.format(f"{name} — NOT IDENTICAL (lossy)")
    return name


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def ran_peers(summary: dict[str, MethodSummary]) -> list[str]:
    """The peers that ran (status ok, at least one prompt)."""
    return [n for n, s in summary.items() if s["kind"] == "peer" and s["status"] == "ok" and s["prompts"]]


def warm(s: MethodSummary, key: str, form: str) -> str:
    """A figure of the method's warm drafter as a cell; – for a method without one (and in older files)."""
    return fmt((s.get("warm") or {}).get(key), form)


def cold(summary: dict[str, MethodSummary]) -> bool:
    """Whether the run measured its drafters cold and warm apart (older files: one drafter per method, shared
    state; none of the cold/warm labels apply)."""
    return any(s.get("drafter") == "cold" for s in summary.values())


COLD_WARM = (
    "Drafters are cold in every figure but the (warm) ones: cold is a fresh drafter on every prompt (what a"
    " user's first request sees), warm the method's drafter as its runs on the earlier prompts of the run left"
    " it (it has never seen the prompt it is measured on). No method shares a drafter's store with another."
)


def overall(summary: dict[str, MethodSummary], peers: list[str]) -> str:
    """The overall table: one row per method and peer; cold figures, then the warm drafter's speedup and
    tokens/pass."""
    c = " (cold)" if cold(summary) else ""
    head = ["method", "status", "lossless", "prompts", "new tokens", "seconds", "tokens/s", f"× plain{c}"]
    head += ["× plain (decode)", "× plain (warm)"]
    head += [f"× {p}" for p in peers] + [f"tokens/pass{c}", "tokens/pass (warm)", "identical", "peak RSS MB"]
    head += ["BW util"]
    rows = []
    for name, s in summary.items():
        ident = fmt(s["identical_fraction"], "{:.0%}")
        if lossy(s):
            ident = RED.format(f"{s['identical_fraction']:.0%} NOT IDENTICAL")
        lossless = "–" if s["lossless"] is None else ("yes" if s["lossless"] else "no")
        row = [_label(name, s), s["status"], lossless, fmt(s["prompts"], "{}"), fmt(s["new_tokens"], "{}")]
        row += [fmt(s["seconds"]), fmt(s["tokens_per_s"], "{:.1f}"), fmt(s["speedup_vs_plain"], "{:.2f}×")]
        row += [fmt(s.get("decode_speedup_vs_plain"), "{:.2f}×"), warm(s, "speedup_vs_plain", "{:.2f}×")]
        row += [fmt(s.get(f"speedup_vs_{p}"), "{:.2f}×") for p in peers]
        row += [fmt(s["tokens_per_pass"]), warm(s, "tokens_per_pass", "{:.2f}"), ident, fmt(s["peak_rss_mb"], "{:.0f}")]
        row += [fmt(s["bandwidth_utilisation"], "{:.1%}")]
        rows.append(row)
    return table(head, rows)


def phases(summary: dict[str, MethodSummary]) -> str:
    """Decode, prompt and end-to-end rates and peak RSS, one row per method and peer that ran."""
    head = ["method", "decode tok/s", "prompt tok/s", "prompt tok/s (long)", "end-to-end tok/s", "peak RSS MB"]
    rows = [
        [_label(n, s), fmt(s.get("decode_tokens_per_s"), "{:.1f}"), fmt(s.get("prompt_tokens_per_s"), "{:.0f}")]
        + [fmt(s.get("long_prompt_tokens_per_s"), "{:.0f}"), fmt(s["tokens_per_s"], "{:.1f}")]
        + [fmt(s["peak_rss_mb"], "{:.0f}")]
        for n, s in summary.items()
        if s["prompts"]
    ]
    return table(head, rows)


def step_line(steps: dict | None) -> str:
    """The plain decoding step's breakdown (`skipjack.bench.steps`), or ''."""
    if not steps:
        return ""
    return (
        f"Plain decoding step at {steps['context']} tokens of context, median of {steps['steps']}: "
        f"{steps['total_ms']:.1f} ms = linear kernels {steps['linears_ms']:.1f} ms + attention "
        f"{steps['attention_ms']:.1f} ms + the rest (Python dispatch, norms, RoPE, elementwise) "
        f"{steps['other_ms']:.1f} ms (each part timed alone; `skipjack.bench.steps`)."
    )


def render_quality(q: dict) -> str:
    """The markdown section for a `skipjack.bench.analysis.quality` result (quality.json)."""
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
    return f"Command: `{q['command']}`\n\n" + table(head, rows) + "\n\n" + note


def in_dtype(summary: dict[str, MethodSummary]) -> str:
    """A line on how `method@dtype` outputs compare with plain decoding in the same dtype ('' if none ran)."""
    shares = {n: s["identical_in_dtype"] for n, s in summary.items() if s.get("identical_in_dtype") is not None}
    if not shares:
        return ""
    each = ", ".join(f"`{n}` {v:.0%}" for n, v in shares.items())
    return (
        "Against plain decoding on the model in the same dtype (`plain@...`), share of identical outputs: "
        f"{each}. The `identical` column compares with `plain`, in the run's dtype."
    )


def _categories(summary: dict[str, MethodSummary]) -> list[str]:
    return list(dict.fromkeys(c for s in summary.values() for c in s.get("by_category") or {}))


def by_category(summary: dict[str, MethodSummary], key: str, form: str) -> str:
    """One row per method that ran: `key` per category, then overall."""
    cats = _categories(summary)
    rows = []
    for name, s in summary.items():
        if s["status"] != "ok" or not s["prompts"]:
            continue
        bc = s["by_category"]
        whole = s["speedup_vs_plain"] if key == "speedup_vs_plain" else s[key]
        rows.append([_label(name, s), *(fmt(bc.get(c, {}).get(key), form) for c in cats), fmt(whole, form)])
    return table(["method", *cats, "overall"], rows)


def acceptance(summary: dict[str, MethodSummary]) -> str:
    rows = []
    for name, s in summary.items():
        if s["status"] != "ok" or not s["prompts"]:
            continue
        hist = s["accept_hist"]
        steps = sum(hist.values())
        shown = ", ".join(f"{k}: {v / steps:.0%}" for k, v in hist.items()) if steps else "–"
        share = fmt(s.get("draft_share"), "{:.1%}")
        row = [_label(name, s), fmt(s["tokens_per_pass"]), warm(s, "tokens_per_pass", "{:.2f}")]
        rows.append(row + [fmt(s["draft_steps"], "{}"), share, shown])
    c = " (cold)" if cold(summary) else ""
    head = ["method", f"tokens per forward pass{c}", "tokens per forward pass (warm)", "verify steps with a draft"]
    return table([*head, "drafting: share of time", "accepted drafts: share"], rows)


def drafters_line(results: Results) -> list[str]:
    """What each model-based drafter chose by the end of the run (skip set, exit layer, adapter), one bullet each."""
    out = []
    for name, d in (results.get("drafters") or {}).items():
        shown = ", ".join(f"{k}: {json.dumps(v)}" for k, v in d.items() if k != "alpha")
        out.append(f"- `{name}`: {shown}")
    return out


def _cost_curves(curves: list[CostCurve]) -> str:
    """The cost model's learned curves, one row per context bucket."""
    ns = list(curves[0]["cost"])
    head = ["context (tokens)", "plain steps", "verify steps", "read at", "plain step (ms)", *(f"c({n})" for n in ns)]
    rows = []
    for c in curves:
        lo, hi = c["context"]
        span = f"{lo}–{hi}" if hi else f"> {lo - 1}"
        t1 = None if c["t1_seconds"] is None else c["t1_seconds"] * 1e3
        at = str(c.get("typical_context", "–"))
        rows.append([span, str(c["plain_steps"]), str(c["verify_steps"]), at, fmt(t1, "{:.1f}")])
        rows[-1] += [fmt(c["cost"][n]) for n in ns]
    notes = (
        "Learned by the shared cost model (`decoding.cost`) from every timed decoding step of this run: c(n) is"
        " the time of one forward over n new tokens relative to a plain step at the same context, read at the"
        ' context in the "read at" column. Each starts from a prior measured at two contexts before the run;'
        " what a bucket learns on top of it carries over to the longer buckets."
    )
    return table(head, rows) + "\n\n" + notes


def targets(summary: dict[str, MethodSummary], model: str | None = None) -> str:
    """The speed targets (targets.json) checked against this run's numbers (on `model`, the run's); '' when
    none of them applies."""
    rows = []
    for t in numbers.check_targets(summary, model=model):
        got, want = t["got"], t["want"]
        met = "–" if got is None or want is None else ("met" if got >= want else RED.format("missed"))
        rows.append([t["label"], fmt(got, "{:.2f}×"), "–" if want is None else f"≥ {want:.2f}×", met, t["how"]])
    if not rows:
        return ""
    return table(["target", "measured", "wanted", "", "how"], rows)


def prefill_bound(results: Results, want: float = 1.5) -> str:
    """Where plain's time goes, and the decoding-phase speedup an end-to-end target of `want` needs
    (`summary.prefill_need`). Empty without pld in the run."""
    need = numbers.prefill_need(results, want)
    if need is None:
        return ""
    pre, total = need["prefill"], need["total"]
    needs = "more than any decoding speedup can give" if need["needs"] is None else f"{need['needs']:.2f}×"
    return (
        f"Plain spends {pre:.0f} of its {total:.0f} s ({pre / total:.0%}) on the prompts' forward passes, which "
        f"speculation does not change: {want:.1f}× end to end needs {needs} on the decoding phase."
    )


def headroom_line(h: dict) -> str:
    """The paragraph for a `skipjack.bench.analysis.headroom` result: what the best prompt-lookup drafter could
    reach."""
    return (
        "Best case for any prompt-lookup drafter (`skipjack.bench.headroom`): a copy oracle that always knows which "
        "span of the prompt and output so far the next greedy tokens repeat, drafts the length that minimises time "
        f"under this run's verify costs, and drafts for free would reach {h['decode_speedup']:.2f}× on the decoding "
        f"phase and {h['end_to_end_speedup']:.2f}× end to end, at {h['oracle_tokens_per_pass']:.2f} tokens per pass "
        f"({h['free_tokens_per_pass']:.2f} if verifying any number of tokens cost one plain step)."
    )


def partial(results: Results) -> list[str]:
    """The red warning for an interrupted run, as markdown lines (none for a complete one)."""
    if results["complete"]:
        return []
    return [RED.format("**Partial results: the run was interrupted (complete: false).**"), ""]


def _header(results: Results) -> list[str]:
    """The bullet list under the title: date, machine, model, suite, command, linear layers."""
    m, model, st = results["machine"], results["model"], results["settings"]
    parts = [
        f"- **Date:** {m['date']}",
        f"- **Machine:** {m['cpu']}, {m['cores']} cores ({m['threads']} threads used), {m['ram_gb']} GB RAM, "
        f"measured memory bandwidth {m['bandwidth_gbs']} GB/s, load average {m.get('load_avg_1m', '?')} at start; "
        f"torch {m['torch']}, transformers {m['transformers']}, "
        f"llama-cpp-python {m['llama_cpp_python'] or 'not installed'}"
        + (f", {m['llama_cpp_build']}" if m.get("llama_cpp_build") else "")
        + isa_text(m),
        f"- **Model:** {model['name']} ({model['dtype']}, {model['params'] / 1e6:.1f}M parameters, "
        f"{model['weight_bytes'] / 1e6:.1f} MB of weights, context {model['context']}); load time: "
        f"cold {fmt(model.get('load_cold_s'), '{:.1f}')} s (GGUF read and converted into an empty cache), "
        f"warm {fmt(model.get('load_warm_s'), '{:.1f}')} s (from the conversion cache)",
        f"- **Suite:** {results['suite']}, {len(results['prompts'])} prompts; max new tokens {st['max_new_tokens']}, "
        f"temperature {st['temperature']}, {st['repeats']} repeats (median kept), warm-up excluded"
        + ("; drafters cold (fresh on every prompt) but where marked warm" if cold(results["summary"]) else ""),
        f"- **Command:** `{results['command']}`",
    ]
    rows = results.get("linear_rows") or {}
    if rows.get("ms"):
        times = ", ".join(f"{n}: {v:.1f}" for n, v in rows["ms"].items())
        parts += [
            f"- **Linear layers by input rows** (one pass over all packed linears, median ms, unpadded): {times}. "
            + _padding_line(rows)
        ]
    return parts


def isa_text(m: dict) -> str:
    """The instruction sets the CPU's flags name, and those they do not, as read at the run (`skipjack.machine`);
    '' for an older file that did not record them."""
    if "isa" not in m:
        return ""
    if m["isa"] is None:
        return "; instruction sets: unknown (no CPU flags could be read)"
    absent = m.get("isa_absent") or []
    kernels = f"; kernels built for {m['kernels_isa']}" if m.get("kernels_isa") else ""
    return (
        f"; instruction sets: {', '.join(m['isa']) or 'none listed'}"
        + (f" (not: {', '.join(absent)})" if absent else "")
        + kernels
    )


def _warnings(summary: dict[str, MethodSummary]) -> list[str]:
    """Peers that did not run, and methods whose output is not plain's."""
    parts = []
    missing = {n: s["status"] for n, s in summary.items() if s["status"] != "ok"}
    if missing:
        parts += ["Peers that did not run: " + "; ".join(f"`{n}`: {why}" for n, why in missing.items()), ""]
    flagged = [n for n, s in summary.items() if lossy(s)]
    if flagged:
        parts += [RED.format("**NOT IDENTICAL to plain greedy output (lossy): " + ", ".join(flagged) + "**"), ""]
    return parts


def render_markdown(
    results: Results,
    img_dir: str = ".",
    title: str = "skipjack benchmark report",
    headroom: dict | None = None,
    split: tuple[list[str], list[list[str]], str] | None = None,
) -> str:
    """REPORT.md: `headroom` is a headroom.json for this run, `split` the clean/looping table (head, rows,
    paragraph) of `skipjack.bench.analysis.loops.loop_split`; each section is left out when None."""
    summary = results["summary"]
    tag = " (cold)" if cold(summary) else ""
    parts = [f"# {title}", "", *partial(results), *_header(results), "", *_warnings(summary)]
    checks = targets(summary, (results.get("model") or {}).get("name"))
    if checks:
        bound = prefill_bound(results)
        parts += ["## Targets", "", checks, ""] + ([bound, ""] if bound else [])
        parts += [headroom_line(headroom), ""] if headroom else []
    if split:
        parts += ["## Clean and looping outputs", "", table(*split[:2]), "", split[2], ""]
    dtype_line = in_dtype(summary)
    parts += ["## Overall", "", overall(summary, ran_peers(summary)), ""] + ([dtype_line, ""] if dtype_line else [])
    parts += ["tokens/s = total new tokens / total seconds; × X = ratio of tokens/s; tokens/pass = new tokens per "]
    parts += ["decoding forward pass; BW util = weight bytes × forward passes/s ÷ measured bandwidth;"]
    parts += ["× plain (decode) = the same ratio over the decoding phase only (after the first token; speculation"]
    parts += ["does not change the prompt's forward pass, which dominates the long-context prompts).", ""]
    parts += [COLD_WARM, ""] if cold(summary) else []
    parts += ["## Decode, prompt and memory", "", phases(summary), ""]
    steps = step_line(results.get("step_breakdown"))
    parts += [steps, ""] if steps else []
    parts += ["prompt tok/s = prompt tokens / seconds to the first token (HF does not stream: –). Peak RSS is the"]
    parts += ["process's while it ran: every engine of the run lives in one process, so it is an upper bound.", ""]
    parts += [f"## Speedup vs plain by category{tag}", "", by_category(summary, "speedup_vs_plain", "{:.2f}×"), ""]
    parts += [f"## Tokens/s by category{tag}", "", by_category(summary, "tokens_per_s", "{:.1f}"), ""]
    parts += ["## Acceptance", "", acceptance(summary), ""]
    chose = drafters_line(results)
    parts += ["What the warm drafters chose by the end of the run:", "", *chose, ""] if chose else []
    if results.get("cost_curves"):
        parts += ["## Verify cost", "", _cost_curves(results["cost_curves"]), ""]
    if results.get("skipped"):
        parts += ["## Skipped prompts", ""]
        parts += [f"- `{s['id']}` ({s['category']}): {s['reason']}" for s in results["skipped"]] + [""]
    parts += ["## Plots", ""]
    for png in PLOTS:
        parts += [f"![{png[:-4]}]({img_dir.rstrip('/')}/{png})", ""]
    return "\n".join(parts)


def summary_text(results: Results) -> str:
    """A short plain-text summary for the terminal."""
    lines = [f"{'method':<16} {'tok/s':>8} {'× plain':>8} {'warm':>8} {'tok/pass':>9} {'identical':>9}  status"]
    for name, s in results["summary"].items():
        ident = fmt(s["identical_fraction"], "{:.0%}") + (" LOSSY" if lossy(s) else "")
        lines.append(
            f"{name:<16} {fmt(s['tokens_per_s'], '{:.1f}'):>8} {fmt(s['speedup_vs_plain'], '{:.2f}x'):>8} "
            f"{warm(s, 'speedup_vs_plain', '{:.2f}x'):>8} {fmt(s['tokens_per_pass']):>9} {ident:>9}  {s['status']}"
        )
    if cold(results["summary"]):
        lines.append("× plain: cold drafters (fresh on every prompt); warm: learned on the run's earlier prompts")
    if not results["complete"]:
        lines.append("(partial results: interrupted)")
    return "\n".join(lines)
