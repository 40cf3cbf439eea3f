"""`python -m skipjack.bench.fleet`: what serving on Ray Serve costs (`skipjack.deploy`), and what its prefix-aware
routing buys.

1. **The layer's overhead**: one server with 2 threads (`SKIPJACK_THREADS=2 skipjack serve`) against 2 replicas
   with 1 thread each (`skipjack serve --replicas 2 --threads 1`) on the same machine, at 1, 4 and 8 streams: the
   quick suite's prompts, streamed, greedy, `--method plain`, the prefix cache off (`bench.serve`'s light
   client): aggregate tokens per second, time to first token, inter-token latency. Both use the same cores, so
   on one machine this is the cost of the layer (the ingress hop, Ray's streaming, a batch per replica instead
   of one batch), not a scale-out gain.
2. **Routing**: a multi-turn chat workload (each of `--conversations` conversations sends `--turns` turns, the
   whole history each time, `--streams` conversations at a time) on 2 replicas routed by prefix
   (`deploy.routing`) and by Serve's default router (power of two choices: load only, blind to prefixes): the
   prefix cache's hit rate (prompt tokens taken from the cache / prompt tokens, from each response's
   `usage.prompt_tokens_details.cached_tokens`), over all turns and over the turns after the first, and the time
   to first token.

Output: `fleet.json` under --out and the tables on stdout. Timing depends on the machine: compare within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from skipjack.bench.serve import _port, _start, level, serve_command
from skipjack.errors import SkipjackError, run_command

FOLLOW_UPS = ("Go on.", "Explain the last part in more detail.", "Give an example.", "Summarise it in one line.")


def _stop(proc) -> None:
    proc.terminate()
    proc.wait(120)


def overhead(a, prompts: list[list[dict]]) -> list[dict]:
    """Part 1: the one-process server and the fleet at each level."""
    levels, rows = [int(x) for x in a.levels.split(",")], []
    setups = [
        ("1 server x 2 threads", [], {"SKIPJACK_THREADS": "2"}),
        ("2 replicas x 1 thread", ["--replicas", "2", "--threads", "1"], {}),
    ]
    for name, extra, env in setups:
        port = _port()
        cmd = serve_command(a.model, port, max(levels), "--method", "plain", "--prefix-cache-mb", "0", *extra)
        proc, url = _start(cmd, port, os.environ | env)
        try:
            level(url, prompts[:1], 1, 8, None)  # warm-up
            for c in levels:
                rows.append({"setup": name} | level(url, prompts, c, a.max_new_tokens, None))
                print(json.dumps(rows[-1]), file=sys.stderr)
        finally:
            _stop(proc)
    return rows


def _turn(url: str, messages: list[dict], tokens: int) -> tuple[dict, str]:
    """One chat turn, whole: (its usage and time to the answer, the answer)."""
    import httpx

    body = {"messages": messages, "max_tokens": tokens, "temperature": 0}
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    if r.status_code != 200:
        raise SkipjackError(f"the server answered {r.status_code}: {r.text[:200]!r}")
    out, seconds = r.json(), time.perf_counter() - t0
    usage, answer = out["usage"], out["choices"][0]["message"]["content"]
    row = {"prompt": usage["prompt_tokens"], "cached": usage["prompt_tokens_details"]["cached_tokens"]}
    return row | {"seconds": seconds, "ttft": out["timings"]["prompt_ms"] / 1000}, answer


def conversation(url: str, first: list[dict], turns: int, tokens: int) -> list[dict]:
    """A conversation's turns in order, each sending the whole history; a row per turn."""
    messages, rows = list(first), []
    for t in range(turns):
        row, answer = _turn(url, messages, tokens)
        rows.append(row | {"turn": t})
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": FOLLOW_UPS[t % 4]}]
    return rows


def _numbered(messages: list[dict], i: int) -> list[dict]:
    """A suite prompt as conversation i's first turn: its last user message numbered, so that no two
    conversations are the same (a repeated one would find its twin's turns in the cache, however routed)."""
    last = dict(messages[-1]) | {"content": f"({i + 1}) {messages[-1]['content']}"}
    return [*messages[:-1], last]


def hit_rate(rows: list[dict]) -> float | None:
    total = sum(r["prompt"] for r in rows)
    return sum(r["cached"] for r in rows) / total if total else None


def routing(a, prompts: list[list[dict]]) -> list[dict]:
    """Part 2: the chat workload on 2 replicas, routed by prefix and by Serve's default router."""
    out = []
    firsts = [_numbered(prompts[i % len(prompts)], i) for i in range(a.conversations)]
    for route in ("prefix", "random"):
        port = _port()
        extra = ["--replicas", "2", "--threads", "1", "--routing", route, "--method", "plain"]
        proc, url = _start(serve_command(a.model, port, 8, *extra), port)
        try:
            with ThreadPoolExecutor(a.streams) as pool:
                runs = list(pool.map(conversation, [url] * len(firsts), firsts, [a.turns] * len(firsts),
                                     [a.max_new_tokens] * len(firsts)))  # fmt: skip
        finally:
            _stop(proc)
        rows = [r for run in runs for r in run]
        later = [r for r in rows if r["turn"] > 0]
        out.append(
            {
                "routing": "prefix" if route == "prefix" else "power of two choices (Serve's default)",
                "turns": len(rows),
                "hit_rate": hit_rate(rows),
                "hit_rate_after_first": hit_rate(later),
                "ttft_p50": statistics.median(r["ttft"] for r in rows),
                "ttft_p50_after_first": statistics.median(r["ttft"] for r in later) if later else None,
            }
        )
        print(json.dumps(out[-1]), file=sys.stderr)
    return out


def tables(res: dict) -> str:
    ms = lambda x: f"{x * 1000:.0f}" if x is not None else "-"  # noqa: E731
    pct = lambda x: f"{x * 100:.1f}%" if x is not None else "-"  # noqa: E731
    lines = [
        "| setup | streams | requests | tok/s | TTFT p50 / p95 (ms) | ITL p50 / p95 (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in res["overhead"]:
        lines.append(
            f"| {r['setup']} | {r['clients']} | {r['requests']} | {r['tok_s']:.1f} | {ms(r['ttft_p50'])} / "
            f"{ms(r['ttft_p95'])} | {ms(r['itl_p50'])} / {ms(r['itl_p95'])} |"
        )
    lines += ["", "| routing | turns | prefix-cache hits | after turn 1 | TTFT p50 (ms) | after turn 1 |"]
    lines.append("|---|---:|---:|---:|---:|---:|")
    for r in res["routing"]:
        lines.append(
            f"| {r['routing']} | {r['turns']} | {pct(r['hit_rate'])} | {pct(r['hit_rate_after_first'])} | "
            f"{ms(r['ttft_p50'])} | {ms(r['ttft_p50_after_first'])} |"
        )
    return "\n".join(lines) + "\n"


def section(res: dict) -> str:
    """The BENCHMARKS.md section (`python -m skipjack.bench.benchmarks_md --bench fleet=DIR`)."""
    m = res["machine"]
    md = "## Replicas on Ray Serve (separate run)\n\n"
    md += (
        f"`make bench-fleet` (`python -m skipjack.bench.fleet --model {res['model']}`): {res['suite']} suite, "
        f"{res['tokens']} new tokens, greedy, streamed. One server with 2 threads against 2 replicas with 1 thread "
        f"each on the same {m.get('cores', '?')} cores ({m.get('cpu', '?')}): this shows the layer's overhead, not "
        "a scale-out gain. Then a multi-turn chat routed by prefix and by Ray Serve's default router: the share "
        "of prompt tokens the prefix cache served.\n\n"
    )
    return md + tables(res)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m skipjack.bench.fleet", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--levels", default="1,4,8", help="concurrent streams per level (part 1)")
    ap.add_argument("--max-new-tokens", "-n", type=int, default=64)
    ap.add_argument("--suite", default="quick")
    ap.add_argument("--prompts", type=int, default=0, help="use only the suite's first N prompts (0: all)")
    ap.add_argument("--conversations", type=int, default=16, help="chat conversations (part 2)")
    ap.add_argument("--turns", type=int, default=4, help="turns per conversation (part 2)")
    ap.add_argument("--streams", type=int, default=4, help="conversations at a time (part 2)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: overhead, routing")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    def body() -> None:
        from skipjack.bench.machine import machine_info
        from skipjack.bench.suite import load_suite

        prompts = [p.messages for p in load_suite(a.suite)][: a.prompts or None]
        out = Path(a.out).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        skip = set(a.skip.split(",")) - {""}
        res = {"model": a.model, "tokens": a.max_new_tokens, "suite": a.suite, "machine": machine_info(0.0)}
        res["overhead"] = overhead(a, prompts) if "overhead" not in skip else []
        res["routing"] = routing(a, prompts) if "routing" not in skip else []
        (out / "fleet.json").write_text(json.dumps(res, indent=1))
        print(tables(res))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
