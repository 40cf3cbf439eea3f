"""`python -m skipjack.bench.structured --out DIR`: structured output's speed, constrained plain against
constrained speculation (with jump-forward drafts) under JSON schemas, on one model.

Each prompt asks for a JSON object and carries the schema it must obey (`PROMPTS`, fixed here: the answers
are not in the prompts, so prompt lookup has only the schema's keys to copy). Methods alternate prompt by
prompt; each request is cold (a copy of its method as prepared, in a store of its own); greedy. `--warm`
methods run a second time, as "NAME, warm": one drafter of their own carried from prompt to prompt (what a
server's shared drafter learns from earlier, different requests; never from the same prompt). Reported per
method: tokens per second, forward passes per token, the share of outputs identical to constrained plain's
(must be all: the constrained methods are lossless) and that parse against their schema; the speed ratio to
constrained plain, and unconstrained plain's speed for the grammar's own cost.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer"},
        "city": {"type": "string", "maxLength": 40},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 4},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}
BOOK = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "author": {"type": "string", "maxLength": 40},
        "year": {"type": "integer"},
        "genres": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        "summary": {"type": "string", "maxLength": 200},
    },
    "required": ["title", "author", "year", "genres", "summary"],
    "additionalProperties": False,
}
ITEMS = {
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 30}, "price": {"type": "number"}},
                "required": ["name", "price"],
                "additionalProperties": False,
            },
            "maxItems": 5,
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}
PROMPTS = [
    ("person", "Describe a fictional software engineer living in Lisbon as JSON.", PERSON),
    ("person2", "Invent a retired teacher from Kyoto and describe them as JSON.", PERSON),
    ("book", "Describe a classic science-fiction novel as JSON.", BOOK),
    ("book2", "Describe a well-known cookbook as JSON.", BOOK),
    ("items", "List five things to buy at a hardware store, with prices, as JSON.", ITEMS),
    ("items2", "List four breakfast foods with their prices in a cafe, as JSON.", ITEMS),
]


def run(model: str, methods: list[str], tokens: int, warm: list[str] = ()) -> dict:
    from skipjack.bench.machine import machine_info
    from skipjack.decoding.constraint import Grammar
    from skipjack.decoding.sampling import SamplingParams
    from skipjack.engine import Engine, Request

    e = Engine.load(model)
    tok = e.tokenizer
    params = SamplingParams(max_new_tokens=tokens, stop_token_ids=tok.stop_ids)
    e.complete(Request(tok.prompt_ids("Hello")[:8], SamplingParams(max_new_tokens=4)))  # warm-up
    runs = ["free:plain"] + methods + [f"{m}, warm" for m in warm]
    # cold: each method has its own store (no method learns from another's runs) and every request starts from
    # a copy of it as prepared (`fork`), so nothing is learned across prompts either; warm: one copy carried on
    fresh = {m: e.new_method(m, own_store=True) for m in methods}
    carried = {f"{m}, warm": e.new_method(m, own_store=True) for m in warm}
    rows = []
    for i, (pid, text, schema) in enumerate(PROMPTS):
        ids, g = tok.prompt_ids(text), Grammar.schema(schema)
        order = runs if i % 2 == 0 else runs[::-1]
        got = {}
        for name in order:
            method = "plain" if name.startswith("free:") else carried[name] if name in carried else fresh[name].fork()
            t = time.perf_counter()
            r = e.complete(Request(ids, params, method, grammar=None if name.startswith("free:") else g))
            got[name] = (r, time.perf_counter() - t)
        base = got["plain"][0] if "plain" in got else None
        for name, (r, dt) in got.items():
            try:
                json.loads(r.text)
                parses = True
            except ValueError:
                parses = False
            rows.append(
                {
                    "prompt": pid,
                    "method": name,
                    "tokens": r.new_tokens,
                    "seconds": dt,
                    "passes": r.forward_passes + 1,
                    "identical": None if base is None or name.startswith("free:") else r.tokens == base.tokens,
                    "parses": parses,
                }
            )
    summary = {}
    for name in runs:
        rs = [x for x in rows if x["method"] == name]
        toks, secs = sum(x["tokens"] for x in rs), sum(x["seconds"] for x in rs)
        summary[name] = {
            "tok_s": toks / secs,
            "passes_per_token": sum(x["passes"] for x in rs) / max(1, toks),
            "identical": sum(bool(x["identical"]) for x in rs),
            "parses": sum(x["parses"] for x in rs),
            "prompts": len(rs),
        }
    plain = summary["plain"]["tok_s"]
    for s in summary.values():
        s["x_constrained_plain"] = s["tok_s"] / plain
    return {"model": model, "tokens": tokens, "machine": machine_info(0.0), "summary": summary, "rows": rows}


def table(res: dict) -> str:
    """The summary as markdown: speed, its ratio to constrained plain, passes per token, identity, parsing."""
    md = "| method | tok/s | × constrained plain | passes/token | identical to constrained plain | parses |\n"
    md += "|---|---:|---:|---:|---:|---:|\n"
    for name, x in res["summary"].items():
        same = "-" if name.startswith("free:") else f"{x['identical']}/{x['prompts']}"
        md += (
            f"| {name} | {x['tok_s']:.1f} | {x['x_constrained_plain']:.2f} | {x['passes_per_token']:.2f} | {same} | "
            f"{x['parses']}/{x['prompts']} |\n"
        )
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m skipjack.bench.structured", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="plain,pld,ngram,auto", help="constrained methods (plain first)")
    ap.add_argument("--warm", default="auto", help="methods also run warm (learning across the prompts)")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    methods = [m for m in a.methods.split(",") if m]
    if "plain" not in methods:
        methods = ["plain"] + methods
    res = run(a.model, methods, a.max_new_tokens, [m for m in a.warm.split(",") if m])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "structured.json").write_text(json.dumps(res, indent=1))
    m = res["machine"]
    print(f"{a.model}, greedy, {a.max_new_tokens} tokens at most, {len(PROMPTS)} prompts")
    print(
        f"{m['cpu']}; {m['cores']} cores; ISA {m['isa']}; kernels built for {m['kernels_isa']}; load {m['load_avg_1m']}"
    )
    print(table(res), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
