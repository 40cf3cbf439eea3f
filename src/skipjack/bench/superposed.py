"""`python -m skipjack.bench.superposed --out DIR`: Superposed Decoding (Shen et al. 2024; lossy,
`skipjack.decoding.superposed`) against k independent streams in one batch, on the quick suite's prompts.

Per prompt, in alternating order: `superposed:k=K` (its K completions from one stream, greedy, its scoring pass
included in the time), K streams in one continuous batch (`Engine.generate_batch`, nucleus sampling as the
paper's baseline: `--temperature`, `--top-p`, seeds 0..K-1) and one greedy plain stream (the reference). Each
row: wall time and tokens per second (all of a variant's completions' tokens over its wall time), each
completion's perplexity under the plain model (exp of minus its mean token log-probability, from one
teacher-forced pass, `Engine.prompt_logprobs`, outside the timed region), and diversity: distinct-n for n = 1,
2 (Li et al. 2016), a prompt's distinct n-grams over all n-grams of its completions. The summary gives
superposed's throughput over the batched streams' (also without its scoring passes, which only report its
completions' log-probabilities: the streams' come with their logits) and its completions' mean perplexity
over plain greedy's and over the streams'.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path


def distinct(completions: list[list[int]], n: int) -> float | None:
    """distinct-n: the distinct n-grams over all n-grams of the completions' tokens (None: no n-gram)."""
    grams = [tuple(c[i : i + n]) for c in completions for i in range(len(c) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def perplexity(engine, prompt: list[int], tokens: list[int]) -> float | None:
    """The completion's perplexity under the plain model (None for an empty one)."""
    if not tokens:
        return None
    lps = engine.prompt_logprobs(prompt + tokens)[len(prompt) :]
    return math.exp(-sum(x.logprob for x in lps) / len(tokens))


def _timed(run):
    t = time.perf_counter()
    out = run()
    return out, time.perf_counter() - t


def run(model: str, dtype: str, k: int, tokens: int, limit: int, temperature: float, top_p: float, tune=True) -> dict:
    from skipjack.bench.machine import machine_info
    from skipjack.decoding.sampling import SamplingParams
    from skipjack.engine import Engine, Request
    from skipjack.prompts import load_suite

    e = Engine.load(model, dtype, tune=tune)
    tok, spec = e.tokenizer, f"superposed:k={k}"
    greedy = SamplingParams(max_new_tokens=tokens, stop_token_ids=tok.stop_ids)
    sampled = [SamplingParams(temperature, top_p=top_p, seed=i, max_new_tokens=tokens, stop_token_ids=tok.stop_ids)
               for i in range(k)]  # fmt: skip
    e.complete(Request(tok.prompt_ids("Hello")[:8], SamplingParams(max_new_tokens=4)))  # warm-up
    variants = {
        spec: lambda ids: e.completions(Request(ids, greedy, spec, n=k)),
        f"{k} streams": lambda ids: e.generate_batch([Request(ids, p) for p in sampled]),
        "plain": lambda ids: [e.complete(Request(ids, greedy))],
    }
    rows = []
    for i, prompt in enumerate(load_suite("quick")[:limit]):
        ids = tok.prompt_ids(prompt.messages)
        for name in list(variants) if i % 2 == 0 else list(variants)[::-1]:
            results, seconds = _timed(lambda: variants[name](ids))  # noqa: B023
            outs = [r.tokens for r in results]
            rows.append(
                {
                    "prompt": prompt.id,
                    "variant": name,
                    "lossless": all(r.lossless for r in results),
                    "seconds": seconds,
                    "tokens": sum(len(t) for t in outs),
                    "perplexity": [perplexity(e, ids, t) for t in outs],
                    "distinct_1": distinct(outs, 1),
                    "distinct_2": distinct(outs, 2),
                    "score_seconds": results[0].superposed.get("score_seconds", 0.0),
                    "texts": [r.text for r in results],
                }
            )
    res = {"model": model, "dtype": e.loaded.dtype, "k": k, "tokens": tokens, "temperature": temperature}
    res |= {"top_p": top_p, "machine": machine_info(0.0), "rows": rows, "summary": summarise(rows)}
    return res


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarise(rows: list[dict]) -> dict:
    """Per variant: tokens per second over all prompts, the mean completion perplexity, mean distinct-1/2; then
    superposed's ratios to the batched streams and to plain (`ratios`)."""
    out = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]
        secs, toks = sum(r["seconds"] for r in rs), sum(r["tokens"] for r in rs)
        out[name] = {
            "lossless": all(r["lossless"] for r in rs),
            "tok_s": toks / secs if secs > 0 else 0.0,
            "seconds": secs,
            "score_seconds": (scored := sum(r["score_seconds"] for r in rs)),
            "tok_s_unscored": toks / (secs - scored) if secs > scored else 0.0,  # without the scoring passes
            "perplexity": _mean([p for r in rs for p in r["perplexity"]]),
            "distinct_1": _mean([r["distinct_1"] for r in rs]),
            "distinct_2": _mean([r["distinct_2"] for r in rs]),
            "prompts": len(rs),
        }
    sup = next((n for n in out if n.startswith("superposed")), None)
    streams = next((n for n in out if n.endswith("streams")), None)
    if sup and streams and "plain" in out:
        ratio = lambda a, b: a / b if a is not None and b else None  # noqa: E731
        s, b, p = out[sup], out[streams], out["plain"]
        out["ratios"] = {
            "throughput_x_streams": ratio(s["tok_s"], b["tok_s"]),
            "throughput_unscored_x_streams": ratio(s["tok_s_unscored"], b["tok_s"]),
            "perplexity_x_plain": ratio(s["perplexity"], p["perplexity"]),
            "perplexity_x_streams": ratio(s["perplexity"], b["perplexity"]),
        }
    return out


def table(res: dict) -> str:
    """The summary as markdown: speed, perplexity, diversity, and whether each variant is lossless."""
    f = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    md = "| variant | lossless | tok/s | mean perplexity | distinct-1 | distinct-2 | scoring s |\n"
    md += "|---|---|---:|---:|---:|---:|---:|\n"
    for name, x in res["summary"].items():
        if name == "ratios":
            continue
        md += (
            f"| {name} | {'yes' if x['lossless'] else 'no'} | {f(x['tok_s'], 1)} | {f(x['perplexity'])} | "
            f"{f(x['distinct_1'])} | {f(x['distinct_2'])} | {f(x['score_seconds'])} |\n"
        )
    if r := res["summary"].get("ratios"):
        md += (
            f"\nsuperposed: {f(r['throughput_x_streams'])}× the batched streams' tokens per second "
            f"({f(r['throughput_unscored_x_streams'])}× without its scoring passes); mean "
            f"perplexity {f(r['perplexity_x_plain'])}× plain greedy's, {f(r['perplexity_x_streams'])}× the streams'\n"
        )
    return md


def section(res: dict) -> str:
    """The BENCHMARKS.md section (`python -m skipjack.bench.benchmarks_md --bench superposed=DIR`)."""
    m = res["machine"]
    md = f"## Superposed Decoding: k completions from one stream, {res['model']} (separate run, lossy)\n\n"
    md += (
        f"`make bench-superposed` (`python -m skipjack.bench.superposed --model {res['model']}`): the quick suite's "
        "first prompts; superposed:k=3 against k sampled streams in one batch and plain greedy; perplexity of every "
        f"completion under the plain model; distinct n-grams across a prompt's completions. {m.get('cpu', '?')}, "
        f"{m.get('cores', '?')} cores, ISA {m.get('isa', '?')}, load {m.get('load_avg_1m', '?')}.\n\n"
    )
    return md + table(res)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m skipjack.bench.superposed", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--k", type=int, default=3, help="completions per prompt (superposed's drafts, the streams)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=6, help="the first N prompts of the quick suite")
    ap.add_argument("--temperature", type=float, default=1.0, help="the streams' sampling temperature")
    ap.add_argument("--top-p", type=float, default=0.9, help="the streams' nucleus")
    ap.add_argument("--no-tune", action="store_true", help="skip measuring this machine's fastest kernels")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    res = run(a.model, a.dtype, a.k, a.max_new_tokens, a.prompts, a.temperature, a.top_p, not a.no_tune)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "superposed.json").write_text(json.dumps(res, indent=1))
    m = res["machine"]
    print(f"{a.model} ({res['dtype']}), k = {a.k}, {a.max_new_tokens} tokens at most, {a.prompts} prompts")
    print(f"{m['cpu']}; {m['cores']} cores; ISA {m['isa']}; load {m['load_avg_1m']}")
    print(table(res), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
