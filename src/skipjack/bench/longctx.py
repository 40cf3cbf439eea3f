"""`python -m skipjack.bench.longctx`: KV cache policies at long contexts (`--kv`), against the full cache.

Per context length, policy and budget, in one run (compare within it: the machine is shared):
1. **Accuracy**: the RULER-style tasks (`skipjack.evaluation.longctx`), greedy, string-matched; reported
   relative to the full cache on the same tasks (a small model is weak at retrieval itself).
2. **Speed and memory**: one long prompt (a needle in real text), `--speed-tokens` new tokens with no stop:
   decoding tokens/s after the first token, the prompt's time, the keys/values the cache holds at the end, and
   the request's peak RSS above what the process held before it (Linux VmHWM, reset before each request).
   The full cache runs first and last at each length; its speed is the mean of the two. `--methods` adds rows
   with the full cache and a lossless method (triforce) for its speedup over plain.
3. **Long-document perplexity**: local prose (`skipjack.evaluation.texts`) as the prompt, then
   `--ppl-tokens` tokens teacher-forced one at a time through the policy's cache, as decoding sees them.

Output under --out: longctx.json, longctx.md (the tables), accuracy_vs_budget.png, latency_vs_context.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from skipjack.errors import SkipjackError

FULL = "full"


def _rss_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
    except OSError:
        pass


def _rss(field: str) -> float:
    """VmRSS / VmHWM of this process in MB (0 where /proc is not there)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith(field)) / 1024
    except (OSError, StopIteration):
        return 0.0


def spec(policy: str, budget: float | None) -> str | None:
    if policy == FULL:
        return None
    if budget is None:
        return policy
    return f"{policy}{',' if ':' in policy else ':'}budget={budget:g}"  # "snapkv:chunk=1024" takes options too


def run(engine, prompt: list[int], kv: str | None, max_new: int, method: str = "plain", stop: bool = True) -> dict:
    """One request; its result and memory."""
    from skipjack.engine import Request
    from skipjack.sampling import SamplingParams

    stops = engine.tokenizer.stop_ids if stop else frozenset()
    params = SamplingParams(max_new_tokens=max_new, stop_token_ids=stops)
    base = _rss("VmRSS")
    _rss_reset()
    r = engine.complete(Request(prompt, params, method, kv=kv))
    decode_s = r.seconds - r.prefill_seconds
    return {
        "text": r.text,
        "new_tokens": r.new_tokens,
        "prefill_s": round(r.prefill_seconds, 3),
        "decode_tok_s": round((r.new_tokens - 1) / decode_s, 3) if r.new_tokens > 1 and decode_s > 0 else None,
        "kv_mb": round(r.kv_bytes / 2**20, 2),
        "peak_mb": round(_rss("VmHWM"), 1),
        "request_peak_mb": round(_rss("VmHWM") - base, 1),
        "tokens_per_pass": round(r.tokens_per_pass, 3),
    }


def accuracy(engine, lengths, configs, n: int, kinds, log) -> list[dict]:
    from skipjack.evaluation import longctx

    rows = []
    for length in lengths:
        tasks = longctx.make_tasks(engine.tokenizer, length, seed=0, n=n, kinds=kinds)
        for policy, budget in configs:
            for t in tasks:
                out = run(engine, t.prompt, spec(policy, budget), t.max_new)
                rows.append(
                    {"length": length, "policy": policy, "budget": budget, "kind": t.kind, "haystack": t.haystack,
                     "seed": t.seed, "score": longctx.score(t, out["text"]), "output": out["text"][:120]}
                )  # fmt: skip
            done = [
                r["score"] for r in rows if r["length"] == length and (r["policy"], r["budget"]) == (policy, budget)
            ]
            log(f"accuracy {length} {spec(policy, budget) or FULL}: {sum(done) / len(done):.3f} over {len(done)} tasks")
    return rows


def speed(engine, lengths, configs, methods, tokens: int, log) -> list[dict]:
    from skipjack.evaluation import longctx

    rows = []
    for length in lengths:
        prompt = longctx.make_tasks(engine.tokenizer, length, seed=1, kinds=("niah_single",), haystacks=("text",))[0]
        runs = [(FULL, None, "plain"), *[(p, b, "plain") for p, b in configs if p != FULL]]
        runs += [(FULL, None, m) for m in methods] + [(FULL, None, "plain")]
        for policy, budget, method in runs:
            out = run(engine, prompt.prompt, spec(policy, budget), tokens, method, stop=False)
            out.pop("text")
            rows.append({"length": length, "policy": policy, "budget": budget, "method": method, **out})
            log(f"speed {length} {spec(policy, budget) or FULL} {method}: {out}")
    return rows


def perplexity(engine, lengths, configs, tokens: int, log) -> list[dict]:
    from skipjack.evaluation import texts
    from skipjack.kvpolicies import make_policy
    from skipjack.session import prefill

    prose = "\n\n".join(texts.documents()[0])
    ids = engine.tokenizer.encode(prose, add_special_tokens=False)
    rows = []
    for length in lengths:
        if length + tokens > len(ids):
            raise SkipjackError(f"not enough local text for a {length}-token document")
        doc = ids[: length + tokens]
        for policy, budget in configs:
            model = engine.model
            with torch.inference_mode():
                start = prefill(model, doc[:length], tokens, policy=make_policy(spec(policy, budget)))
                cache, logits, nll = start.cache, start.logits, 0.0
                for i in range(length, length + tokens):
                    nll -= float(torch.log_softmax(logits.float(), -1)[doc[i]])
                    if i + 1 < length + tokens:
                        logits = model(torch.tensor([[doc[i]]]), cache).logits[0, -1]
                        cache.settle()
            rows.append({"length": length, "policy": policy, "budget": budget, "ppl": round(math.exp(nll / tokens), 4)})
            log(f"perplexity {length} {spec(policy, budget) or FULL}: {rows[-1]['ppl']}")
    return rows


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
        row["speedup"] = round(r["decode_tok_s"] / base, 3) if base and r["decode_tok_s"] else None
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
        "| KV MB | request peak MB |"
    )
    lines = [head, "|" + "---|" * 9]

    def f(v, fmt="{:.2f}"):
        return "" if v is None else fmt.format(v)

    for k, r in sorted(s.items(), key=lambda kv: (int(kv[0].split("|")[0]), kv[0])):
        length, policy, budget = k.split("|")
        acc = f"{f(r.get('accuracy'))} ({f(r.get('relative_accuracy'), '{:.0%}')})" if "accuracy" in r else ""
        speed = f"{f(r.get('decode_tok_s'))} ({f(r.get('speedup'), '{:.2f}×')})" if r.get("decode_tok_s") else ""
        ppl, kv, peak = (
            f(r.get("ppl_change"), "{:+.1%}"),
            f(r.get("kv_mb"), "{:.1f}"),
            f(r.get("request_peak_mb"), "{:.0f}"),
        )
        budget = "" if budget == "None" else budget
        lines.append(
            f"| {length} | {policy} | {budget} | {acc} | {ppl} | {speed} | {f(r.get('prefill_s'))} | {kv} | {peak} |"
        )
    return "\n".join(lines) + "\n"


def plots(res: dict, out: Path) -> None:
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
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_budget.png", dpi=110)
    plt.close(fig)
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
    fig.savefig(out / "latency_vs_context.png", dpi=110)
    plt.close(fig)


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m skipjack.bench.longctx", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="q4")
    ap.add_argument("--policies", default="streaming,h2o,snapkv,pyramidkv,cake,tidal")
    ap.add_argument("--budgets", default="0.05,0.1,0.25,0.5")
    ap.add_argument("--lengths", default="2048,4096,8192", help="contexts for speed, memory and perplexity")
    ap.add_argument("--task-lengths", default=None, help="contexts for the tasks (default: --lengths)")
    ap.add_argument("--task-budgets", default=None, help="budgets for the tasks (default: --budgets)")
    ap.add_argument("--kinds", default="niah_single,niah_multikey,niah_multivalue,vt,cwe")
    ap.add_argument("--n", type=int, default=1, help="tasks per kind and haystack")
    ap.add_argument("--speed-tokens", type=int, default=32)
    ap.add_argument("--speed-budgets", default="0.1", help="budgets for the speed rows")
    ap.add_argument("--ppl-tokens", type=int, default=64)
    ap.add_argument("--methods", default="triforce", help="lossless methods run with the full cache (speed rows)")
    ap.add_argument("--skip", default="", help="parts to skip: accuracy,speed,perplexity")
    ap.add_argument("--out", default="bench-out/longctx")
    a = ap.parse_args(argv)
    from skipjack.bench.machine import machine_info
    from skipjack.engine import Engine
    from skipjack.kvpolicies import make_policy

    policies = [p for p in a.policies.split(",") if p]
    for p in policies:
        make_policy(spec(p, 0.5))  # an unknown policy fails now, not after an hour
    cfg = lambda budgets: [(FULL, None)] + [(p, b) for b in budgets for p in policies]  # noqa: E731
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.0f}s] {msg}", file=sys.stderr, flush=True)

    engine = Engine.load(a.model, a.dtype)
    res: dict = {"model": a.model, "dtype": a.dtype, "machine": machine_info(0.0), "args": vars(a)}
    lengths, skip = _ints(a.lengths), set(a.skip.split(","))
    if "accuracy" not in skip:
        budgets = _floats(a.task_budgets or a.budgets)
        res["accuracy"] = accuracy(
            engine, _ints(a.task_lengths or a.lengths), cfg(budgets), a.n, a.kinds.split(","), log
        )
    if "perplexity" not in skip:
        res["perplexity"] = perplexity(engine, lengths, cfg(_floats(a.budgets)), a.ppl_tokens, log)
    if "speed" not in skip:
        methods = [m for m in a.methods.split(",") if m]
        res["speed"] = speed(engine, lengths, cfg(_floats(a.speed_budgets)), methods, a.speed_tokens, log)
    res["summary"] = summary(res)
    res["seconds"] = round(time.time() - t0, 1)
    (out / "longctx.json").write_text(json.dumps(res, indent=1))
    (out / "longctx.md").write_text(markdown(res))
    plots(res, out)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
