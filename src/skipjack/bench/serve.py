"""`python -m skipjack.bench.serve`: the server under load, with our own light client. Starts `skipjack serve` on a
model (and llama.cpp's server on the same GGUF: its own llama-server where `make bench-peers` built it, else
llama-cpp-python's `llama_cpp.server`), then at each concurrency C sends the quick suite's prompts from C
clients at once (streaming, greedy, fixed new tokens) and measures aggregate generated tokens per second and,
per request, time to first token and inter-token latency ((last chunk - first chunk) / (tokens - 1)); p50 /
p95 over the requests. One skipjack server (plain by default, its prefix cache off so no method finds another's
prompts computed) serves every method: the speculative ones through each request's `speculative.method`.
`make bench-serve` also runs `skipjack.bench.loadgen`, the same measured by aiperf with a server per method.

Output: `serve.json` and `serve.png` under --out. Timing depends on the machine: compare ratios within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from skipjack.errors import SkipjackError, run_command

LEVELS = (1, 2, 4, 8, 16)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, limit: float = 900) -> None:
    import httpx

    end = time.time() + limit
    while time.time() < end:
        if proc.poll() is not None:
            raise SkipjackError(
                f"the server exited ({proc.returncode}) before it was ready: {proc.stderr.read()[-300:]}"
            )
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:  # llama_cpp.server has no /health
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SkipjackError(f"the server at {url} was not ready after {limit:.0f} s")


def _one(url: str, messages: list[dict], tokens: int, method: str | None) -> dict:
    """One streaming request: (generated tokens, seconds to first chunk, mean seconds between tokens, end)."""
    import httpx

    body = {  # no "model": each server serves its one model (skipjack answers another name with a 404)
        "messages": messages,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if method is not None:
        body["speculative"] = {"method": method}
    t0, first, last, n, chunks = time.perf_counter(), None, None, 0, 0
    with httpx.Client(timeout=600) as c, c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise SkipjackError(f"the server answered {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            elif chunk.get("choices") and (chunk["choices"][0].get("delta") or {}).get("content"):
                chunks += 1
                now = time.perf_counter()
                first = first if first is not None else now
                last = now
    n = n or chunks  # llama_cpp.server sends no usage when streaming: one chunk per token there
    first = first or time.perf_counter()
    itl = (last - first) / (n - 1) if last is not None and n > 1 else None
    return {"tokens": n, "ttft": first - t0, "itl": itl, "start": t0, "end": time.perf_counter()}


def level(url: str, prompts: list[list[dict]], clients: int, tokens: int, method: str | None) -> dict:
    """Every prompt once (at least 2 x clients requests), from `clients` clients at once."""
    work = [prompts[i % len(prompts)] for i in range(max(len(prompts), 2 * clients))]
    with ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(lambda m: _one(url, m, tokens, method), work))
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    q = lambda xs, p: statistics.quantiles(xs, n=20)[p] if len(xs) > 1 else xs[0]  # noqa: E731
    ttft, itl = [r["ttft"] for r in runs], [r["itl"] for r in runs if r["itl"] is not None]
    return {
        "clients": clients,
        "requests": len(runs),
        "tokens": sum(r["tokens"] for r in runs),
        "tok_s": sum(r["tokens"] for r in runs) / wall,
        "ttft_p50": statistics.median(ttft),
        "ttft_p95": q(ttft, 18),
        "itl_p50": statistics.median(itl) if itl else None,
        "itl_p95": q(itl, 18) if itl else None,
    }


def agreement(model: str, prompts: list[list[dict]], dtypes: list[str], tokens: int) -> list[dict]:
    """Batched greedy against alone, in process, per dtype: every prompt alone, then all of them in one
    continuous batch (plain decoding, so only the batch changes). Where the forward is batch-invariant (q4,
    q8) they must be identical; elsewhere (fp32 and bf16 dense GEMMs round by batch shape) this measures how
    often and how late they part: identical share, and the mean share of tokens before the first difference."""
    from skipjack.decoding.sampling import SamplingParams
    from skipjack.engine import Engine, Request

    out = []
    for dtype in dtypes:
        e = Engine.load(model, dtype, tune=False)
        params = SamplingParams(max_new_tokens=tokens, stop_token_ids=e.tokenizer.stop_ids)
        ids = [e.tokenizer.prompt_ids(m) for m in prompts]
        alone = [e.complete(Request(list(x), params)).tokens for x in ids]
        batched = [r.tokens for r in e.generate_batch([Request(list(x), params) for x in ids])]
        same = [a == b for a, b in zip(alone, batched)]
        prefix = [
            next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            for a, b in zip(alone, batched)
        ]
        shares = [p / max(1, len(a)) if not s else 1.0 for p, a, s in zip(prefix, alone, same)]
        out.append(
            {
                "dtype": dtype,
                "prompts": len(prompts),
                "batch": len(prompts),
                "identical": sum(same),
                "mean_prefix_share": statistics.mean(shares),
            }
        )
        print(json.dumps(out[-1]), file=sys.stderr)
    return out


def agreement_table(rows: list[dict]) -> str:
    md = [
        "| dtype | prompts (one batch) | identical to alone | mean share before the first difference |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        md.append(
            f"| {r['dtype']} | {r['prompts']} | {r['identical']} / {r['prompts']} | {r['mean_prefix_share']:.1%} |"
        )
    return "\n".join(md) + "\n"


def _start(cmd: list[str], port: int, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    # The server's log goes to a file: a pipe nobody reads fills up (llama.cpp logs a lot) and blocks it.
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env or os.environ)
    proc.log = log
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, proc)
    except BaseException:
        proc.kill()
        raise
    return proc, url


def serve_command(model: str, port: int, max_batch: int, *extra: str) -> list[str]:
    """`skipjack serve` on `model` at `port` in a child process, `max_batch` requests decoded together."""
    cmd = [sys.executable, "-m", "skipjack.cli", "serve", "--model", model, "--port", str(port)]
    return cmd + ["--max-batch", str(max_batch), "--max-queue", "256", *extra]


def _llama_server(gguf: Path, port: int, n_ctx: int, parallel: int) -> list[str] | None:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        return None
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        str(os.cpu_count() or 1),
        "--interrupt_requests",  # False: by default it cancels the request in flight when another arrives
        "False",
    ]


def peer(gguf: Path, streams: int, slot: int = 1024):
    """(label, port -> command) of llama.cpp's server on the GGUF: its own llama-server where `make bench-peers`
    built it (one slot per stream, `slot` tokens each), else `llama_cpp.server`; None if neither is there."""
    from skipjack import store

    exe = store.home() / "llama-server"
    if exe.exists():
        threads = str(os.cpu_count() or 1)
        return "llama-server", lambda p: [
            str(exe),
            "-m",
            str(gguf),
            "--port",
            str(p),
            "--alias",
            gguf.stem,
            "-np",
            str(streams),
            "-c",
            str(slot * streams),
            "-t",
            threads,
            "-cb",
        ]
    if _llama_server(gguf, 0, 4096, streams) is None:
        return None
    return "llama_cpp.server", lambda p: _llama_server(gguf, p, 4096, streams)


def run(a) -> dict:
    from skipjack.bench.machine import machine_info
    from skipjack.bench.suite import load_suite
    from skipjack.loading.load import NAMED, fetch_named

    prompts = [p.messages for p in load_suite(a.suite)]
    levels = [int(x) for x in a.levels.split(",")]
    out: dict = {
        "model": a.model,
        "tokens": a.max_new_tokens,
        "suite": a.suite,
        "machine": machine_info(0.0),
        "runs": [],
    }
    if a.agreement:
        out["agreement"] = agreement(a.model, prompts, a.agreement.split(","), a.max_new_tokens)
    port = _port()
    # one server for every method, plain by default (the others are asked per request); the prefix cache off,
    # so no method finds another's prompts computed
    cmd = serve_command(a.model, port, max(levels), "--method", "plain", "--prefix-cache-mb", "0")
    proc, url = _start(cmd, port)
    try:
        _one(url, prompts[0], 8, None)  # warm-up
        for method in a.methods.split(","):
            for c in levels:
                r = level(url, prompts, c, a.max_new_tokens, None if method == "plain" else method)
                out["runs"].append({"server": "skipjack", "method": method} | r)
                print(json.dumps(out["runs"][-1]), file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(60)
    gguf = fetch_named(a.model) if a.model in NAMED else Path(a.model)
    found = peer(gguf, max(levels), 4096) if gguf.suffix == ".gguf" else None  # a slot holds the suite's longest
    if found is None:
        out["llama_server"] = "not run: neither llama-server nor llama-cpp-python[server] is built (make bench-peers)"
    else:
        out["peer"], port = found[0], _port()
        proc, url = _start(found[1](port), port)
        try:
            _one(url, prompts[0], 8, None)
            for c in levels:
                r = level(url, prompts, c, a.max_new_tokens, None)
                out["runs"].append({"server": found[0], "method": "plain"} | r)
                print(json.dumps(out["runs"][-1]), file=sys.stderr)
        finally:
            proc.terminate()
            proc.wait(60)
    return out


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    series = sorted({(r["server"], r["method"]) for r in res["runs"]})
    for server, method in series:
        rows = [r for r in res["runs"] if (r["server"], r["method"]) == (server, method)]
        xs = [r["clients"] for r in rows]
        ax1.plot(xs, [r["tok_s"] for r in rows], marker="o", label=f"{server} {method}")
        ax2.plot(xs, [(r["itl_p50"] or 0) * 1000 for r in rows], marker="o", label=f"{server} {method}")
    ax1.set(xlabel="concurrent clients", ylabel="generated tok/s (all clients)", xscale="log", title="throughput")
    ax2.set(xlabel="concurrent clients", ylabel="inter-token latency p50 (ms)", xscale="log", title="latency")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(res: dict) -> str:
    """The runs as a markdown table, throughput also as a ratio to the same server and method alone."""
    rows = [
        "| server | method | clients | requests | tok/s | × alone | TTFT p50 / p95 (ms) | ITL p50 / p95 (ms) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["runs"]:
        base = next(
            x
            for x in res["runs"]
            if (x["server"], x["method"], x["clients"]) == (r["server"], r["method"], min(LEVELS))
        )
        ms = lambda x: f"{x * 1000:.0f}" if x is not None else "-"  # noqa: E731
        rows.append(
            f"| {r['server']} | {r['method']} | {r['clients']} | {r['requests']} | {r['tok_s']:.1f} | "
            f"{r['tok_s'] / base['tok_s']:.2f} | {ms(r['ttft_p50'])} / {ms(r['ttft_p95'])} | "
            f"{ms(r['itl_p50'])} / {ms(r['itl_p95'])} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m skipjack.bench.serve", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="plain,pld,auto", help="comma list: plain and speculative methods to compare")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrent clients per level")
    ap.add_argument("--max-new-tokens", "-n", type=int, default=64)
    ap.add_argument("--suite", default="quick")
    ap.add_argument(
        "--agreement",
        default="q4,bf16,fp32",
        help="dtypes whose batched-vs-alone greedy agreement is measured first, in process ('' to skip)",
    )
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    def body() -> None:
        out = Path(a.out).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        res = run(a)
        (out / "serve.json").write_text(json.dumps(res, indent=1))
        plot(res, out / "serve.png")
        print(table(res))
        if res.get("agreement"):
            print(agreement_table(res["agreement"]))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
