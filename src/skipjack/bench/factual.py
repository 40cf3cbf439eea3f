"""`python -m skipjack.bench.factual --model M --out DIR`: contrastive layer decoding's factual accuracy and
speed, against plain decoding on the same model.

The questions are `evaluation.facts` (countries -> capitals, elements -> symbols and atomic numbers, made from
maintained data packages; `--every K` keeps every K-th item of each kind). Per method: exact-match accuracy of
greedy answers (8 tokens at most, cut at a newline), multiple-choice accuracy by the method's own scores (four
options), both per kind; and decoding speed: milliseconds per token over `--speed-tokens` tokens on the first
four questions (end of text ignored), the methods alternating prompt by prompt (drift on a shared machine hits
them all), as a ratio to plain. Every request is the method's own (a strategy per request; nothing shared).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _answers(engine, method: str, items, log) -> dict:
    from skipjack.decoding.sampling import SamplingParams
    from skipjack.engine import Request
    from skipjack.evaluation.facts import choice, right
    from skipjack.methods import MethodSpec, strategy

    tok, spec = engine.tokenizer, MethodSpec.parse(method)
    per: dict[str, dict[str, int]] = {}
    for i, f in enumerate(items):
        r = engine.complete(
            Request(
                prompt=tok.encode(f.prompt),
                params=SamplingParams(max_new_tokens=8, stop_token_ids=tok.stop_ids),
                method=method,
                stop=("\n",),
            )
        )
        row = per.setdefault(f.kind, {"items": 0, "exact": 0, "choice": 0})
        row["items"] += 1
        row["exact"] += right(r.text, f)
        row["choice"] += choice(engine.model, strategy(spec, tok), tok, f) == f.gold
        if i % 50 == 49:
            log(f"  {method}: {i + 1}/{len(items)}")
    return per


def _speed(engine, methods: list[str], items, tokens: int) -> dict:
    from skipjack.decoding.sampling import SamplingParams
    from skipjack.engine import Request

    secs, toks = dict.fromkeys(methods, 0.0), dict.fromkeys(methods, 0)
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    for f in items[:4]:
        for m in methods:
            r = engine.complete(Request(prompt=engine.tokenizer.encode(f.prompt), params=params, method=m))
            secs[m] += r.seconds - r.prefill_seconds
            toks[m] += r.new_tokens - 1
    ms = {m: 1000 * secs[m] / max(1, toks[m]) for m in methods}
    return {m: {"ms_per_token": ms[m], "x_plain_time": ms[m] / ms["plain"]} for m in methods}


def run(model: str, methods: list[str], every: int, speed_tokens: int, log=print) -> dict:
    from skipjack.bench.machine import machine_info
    from skipjack.engine import Engine
    from skipjack.evaluation.facts import facts

    engine = Engine.load(model)
    items = facts(every=every)
    _speed(engine, methods, items[:1], 4)  # warm-up: methods prepared, kernels touched, outside the timed runs
    speed = _speed(engine, methods, items, speed_tokens)
    rows = {}
    for m in methods:
        log(f"{m}: {len(items)} questions")
        per = _answers(engine, m, items, log)
        n = sum(r["items"] for r in per.values())
        rows[m] = {
            "lossless": m == "plain",
            "exact": sum(r["exact"] for r in per.values()) / n,
            "choice": sum(r["choice"] for r in per.values()) / n,
            "kinds": per,
        } | speed[m]
    return {"model": model, "items": len(items), "every": every, "machine": machine_info(0.0), "rows": rows}


def speed_again(out: Path, tokens: int) -> dict:
    """An accuracy run's factual.json with its speed measured again (its methods; accuracy unchanged)."""
    from skipjack.bench.machine import machine_info
    from skipjack.engine import Engine
    from skipjack.evaluation.facts import facts
    from skipjack.schemas import FactualRun, read_json

    res = read_json("factual results", out / "factual.json", FactualRun).model_dump()
    engine, items = Engine.load(res["model"]), facts(every=res.get("every", 1))
    methods = list(res["rows"])
    _speed(engine, methods, items[:1], 4)  # warm-up
    for m, figures in _speed(engine, methods, items, tokens).items():
        res["rows"][m] |= figures
    res["machine"] = machine_info(0.0)
    return res


def table(res: dict) -> str:
    """Accuracy (exact match and multiple choice, all kinds and per kind) and time per token against plain."""
    kinds = list(next(iter(res["rows"].values()))["kinds"])
    md = "| method | lossy | exact match | multiple choice | " + " | ".join(f"{k} (EM / MC)" for k in kinds)
    md += " | ms/token | × plain's time |\n|---|---|---:|---:|" + "---:|" * len(kinds) + "---:|---:|\n"
    for name, x in res["rows"].items():
        cells = [f"{x['kinds'][k]['exact'] / x['kinds'][k]['items']:.1%} / " for k in kinds]
        cells = [c + f"{x['kinds'][k]['choice'] / x['kinds'][k]['items']:.1%}" for c, k in zip(cells, kinds)]
        md += f"| {name} | {'no' if x['lossless'] else 'yes'} | {x['exact']:.1%} | {x['choice']:.1%} | "
        md += " | ".join(cells) + f" | {x['ms_per_token']:.1f} | {x['x_plain_time']:.2f} |\n"
    return md


def section(res: dict) -> str:
    """The BENCHMARKS.md section (`python -m skipjack.bench.benchmarks_md --bench factual=DIR`)."""
    m = res["machine"]
    md = f"## Factual accuracy: contrastive layer decoding on {res['model']} (separate run)\n\n"
    md += (
        f"`python -m skipjack.bench.factual --model {res['model']} --every {res['every']}`: {res['items']} questions "
        "with one right answer each (countries' capitals from countryinfo, elements' symbols and atomic numbers "
        "from periodictable), two worked examples before each. Exact match: the greedy answer's first line. "
        "Multiple choice: four options scored by the method's own log-probabilities (plausibility constraint off). "
        f"Time per token: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, ISA {m.get('isa', '?')}.\n\n"
    )
    return md + table(res)


def main(argv: list[str] | None = None) -> int:
    from skipjack.methods import MethodSpec

    ap = argparse.ArgumentParser(prog="python -m skipjack.bench.factual", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="plain,dola,lol", help="methods (plain is always first)")
    ap.add_argument("--every", type=int, default=1, help="every K-th question of each kind")
    ap.add_argument("--speed-tokens", type=int, default=48)
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--speed-only", action="store_true", help="measure time per token again into DIR's factual.json (quiet machine)"
    )
    a = ap.parse_args(argv)
    methods = ["plain"] + [m for m in a.methods.split(",") if m and m != "plain"]
    for m in methods:
        MethodSpec.parse(m)  # a bad method fails before anything loads
    if a.every < 1 or a.speed_tokens < 2:
        ap.error("--every must be >= 1 and --speed-tokens >= 2")
    res = speed_again(Path(a.out), a.speed_tokens) if a.speed_only else run(a.model, methods, a.every, a.speed_tokens)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "factual.json").write_text(json.dumps(res, indent=1))  # read back by benchmarks_md --bench factual=DIR
    m = res["machine"]
    print(f"{a.model}, greedy, {res['items']} questions (every {a.every})")
    print(f"{m['cpu']}; {m['cores']} cores; ISA {m['isa']}; kernels built for {m['kernels_isa']}")
    print(table(res), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
