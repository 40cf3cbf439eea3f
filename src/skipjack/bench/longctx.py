"""`python -m skipjack.bench.longctx`: KV cache policies at long contexts (`--kv`), against the full cache.

Per context length, policy and budget, in one run (compare within it: the machine is shared):
1. **Accuracy**: the RULER-style tasks (`skipjack.evaluation.longctx`), greedy, string-matched; reported
   relative to the full cache on the same tasks (a small model is weak at retrieval itself).
2. **Speed and memory**: one long prompt (a needle in real text), `--speed-tokens` new tokens with no stop:
   decoding tokens/s after the first token, the prompt's time, the keys/values the cache holds at the end, and
   the request's peak RSS above what the process held before it (sampled every 10 ms).
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


def spec(policy: str, budget: float | None) -> str | None:
    if policy == FULL:
        return None
    if budget is None:
        return policy
    return f"{policy}{',' if ':' in policy else ':'}budget={budget:g}"  # "snapkv:chunk=1024" takes options too


def run(engine, prompt: list[int], kv: str | None, max_new: int, method: str = "plain", stop: bool = True) -> dict:
    """One request; its result and memory."""
    from skipjack.bench.machine import RssSampler
    from skipjack.decoding.sampling import SamplingParams
    from skipjack.engine import Request

    stops = engine.tokenizer.stop_ids if stop else frozenset()
    params = SamplingParams(max_new_tokens=max_new, stop_token_ids=stops)
    rss = RssSampler(0.01)  # the process's RSS every 10 ms, while the request runs
    rss.label = "before"
    rss.sample()
    rss.start()
    rss.label = "request"
    try:
        r = engine.complete(Request(prompt, params, method, kv=kv))
    finally:
        rss.stop()
        rss.join()
    rss.sample()
    decode_s = r.seconds - r.prefill_seconds
    return {
        "text": r.text,
        "new_tokens": r.new_tokens,
        "prefill_s": round(r.prefill_seconds, 3),
        "decode_tok_s": round((r.new_tokens - 1) / decode_s, 3) if r.new_tokens > 1 and decode_s > 0 else None,
        "kv_mb": round(r.kv_bytes / 2**20, 2),
        "peak_mb": round(rss.peaks.get("request", 0.0), 1),
        "request_peak_mb": round(rss.peaks.get("request", 0.0) - rss.peaks["before"], 1),
        "tokens_per_pass": round(r.tokens_per_pass, 3),
    }


def fit(engine, length: int, new: int) -> int:
    """The prompt length for a `length` context: what leaves room for `new` tokens and a draft in the model's
    context (SmolLM2's is 8192: an "8k" prompt is a little shorter)."""
    from skipjack.limits import MAX_DRAFT

    return min(length, engine.model.config.max_position_embeddings - new - MAX_DRAFT - 2)


def accuracy(engine, lengths, configs, n: int, kinds, log) -> list[dict]:
    from skipjack.evaluation import longctx

    rows = []
    for length in lengths:
        tasks = longctx.make_tasks(engine.tokenizer, fit(engine, length, 64), seed=0, n=n, kinds=kinds)
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
        size = fit(engine, length, tokens)
        prompt = longctx.make_tasks(engine.tokenizer, size, seed=1, kinds=("niah_single",), haystacks=("text",))[0]
        runs = [(FULL, None, "plain"), *[(p, b, "plain") for p, b in configs if p != FULL]]
        runs += [(FULL, None, m) for m in methods] + [(FULL, None, "plain")]
        for policy, budget, method in runs:
            out = run(engine, prompt.prompt, spec(policy, budget), tokens, method, stop=False)
            out.pop("text")
            rows.append({"length": length, "policy": policy, "budget": budget, "method": method, **out})
            log(f"speed {length} {spec(policy, budget) or FULL} {method}: {out}")
    return rows


_CHILD = """
import json, sys
from skipjack.bench.longctx import run
from skipjack.engine import Engine
from skipjack.evaluation import longctx
e = Engine.load(sys.argv[1], sys.argv[2], tune=False)
task = longctx.make_tasks(e.tokenizer, int(sys.argv[3]), seed=1, kinds=("niah_single",), haystacks=("text",))[0]
out = run(e, task.prompt, sys.argv[4] or None, 16, stop=False)
hwm = int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1]) / 1024
print(json.dumps({"hwm_mb": round(hwm, 1), "kv_mb": out["kv_mb"]}))
"""


def memory(model: str, dtype: str, lengths, configs, log) -> list[dict]:
    """Each (length, policy) in a fresh process: its peak RSS (VmHWM: model, prompt pass and cache together)."""
    import subprocess

    rows = []
    for length in lengths:
        for policy, budget in configs:
            kv = spec(policy, budget) or ""
            r = subprocess.run(
                [sys.executable, "-c", _CHILD, model, dtype, str(length), kv], capture_output=True, text=True
            )
            if r.returncode != 0:
                raise SkipjackError(f"the memory run for {kv or FULL} at {length} failed: {r.stderr.strip()[-300:]}")
            got = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append({"length": length, "policy": policy, "budget": budget, **got})
            log(f"memory {length} {kv or FULL}: {got}")
    return rows


def perplexity(engine, lengths, configs, tokens: int, log) -> list[dict]:
    from skipjack.decoding.session import prefill
    from skipjack.evaluation import texts
    from skipjack.kvpolicies import make_policy

    prose = "\n\n".join(texts.documents()[0])
    ids = engine.tokenizer.encode(prose, add_special_tokens=False)
    rows = []
    for length in lengths:
        if length + tokens > len(ids):
            raise SkipjackError(f"not enough local text for a {length}-token document")
        doc = ids[: fit(engine, length + tokens, 0)]
        n = len(doc) - tokens  # the prompt (a little shorter than `length` at the model's context)
        for policy, budget in configs:
            model = engine.model
            with torch.inference_mode():
                start = prefill(model, doc[:n], tokens, policy=make_policy(spec(policy, budget)))
                cache, logits, nll = start.cache, start.logits, 0.0
                for i in range(n, n + tokens):
                    nll -= float(torch.log_softmax(logits.float(), -1)[doc[i]])
                    if i + 1 < n + tokens:
                        logits = model(torch.tensor([[doc[i]]]), cache).logits[0, -1]
                        cache.settle()
            rows.append({"length": length, "policy": policy, "budget": budget, "ppl": round(math.exp(nll / tokens), 4)})
            log(f"perplexity {length} {spec(policy, budget) or FULL}: {rows[-1]['ppl']}")
    return rows


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m skipjack.bench.longctx", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="q4")
    ap.add_argument("--policies", default="streaming,h2o,snapkv,pyramidkv,cake,actqkv,tidal")
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
    ap.add_argument("--memory-lengths", default="8192", help="contexts for the peak-RSS runs (fresh processes)")
    ap.add_argument("--memory-policies", default="snapkv:chunk=1024", help="policies for the peak-RSS runs")
    ap.add_argument("--memory-budgets", default="0.05,0.1,0.25,0.5")
    ap.add_argument("--skip", default="", help="parts to skip: accuracy,speed,perplexity,memory")
    ap.add_argument("--out", default="bench-out/longctx")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    from skipjack.bench.longctx_report import markdown, plots, summary
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
    res["command"] = "python -m skipjack.bench.longctx " + " ".join(argv if argv is not None else sys.argv[1:])
    lengths, skip = _ints(a.lengths), set(a.skip.split(","))

    def save() -> None:  # after each part: a run stopped later keeps what it measured
        res["summary"] = summary(res)
        res["seconds"] = round(time.time() - t0, 1)
        (out / "longctx.json").write_text(json.dumps(res, indent=1))

    if "accuracy" not in skip:
        budgets = _floats(a.task_budgets or a.budgets)
        res["accuracy"] = accuracy(
            engine, _ints(a.task_lengths or a.lengths), cfg(budgets), a.n, a.kinds.split(","), log
        )
        save()
    if "perplexity" not in skip:
        res["perplexity"] = perplexity(engine, lengths, cfg(_floats(a.budgets)), a.ppl_tokens, log)
        save()
    if "speed" not in skip:
        methods = [m for m in a.methods.split(",") if m]
        res["speed"] = speed(engine, lengths, cfg(_floats(a.speed_budgets)), methods, a.speed_tokens, log)
        save()
    if "memory" not in skip:
        mem = [(FULL, None)] + [(p, b) for p in a.memory_policies.split(",") if p for b in _floats(a.memory_budgets)]
        res["memory"] = memory(a.model, a.dtype, _ints(a.memory_lengths), mem, log)
    save()
    (out / "longctx.md").write_text(markdown(res))
    plots(res, out)
    print(markdown(res))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
