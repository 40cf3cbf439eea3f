"""`python -m skipjack.bench.loadgen`: the server under load, measured by a maintained load generator, NVIDIA's
aiperf (in a virtual environment of its own: its pins clash with ours; `make bench-serve` makes it).

Each configuration gets a fresh server process, so compared methods share no state (no learned drafter, no
prefix cache):
- `skipjack plain` and `skipjack auto` (`serve --method ...`, prefix cache off), and llama.cpp's own
  llama-server on the same GGUF (plain, one slot per stream, continuous batching; `make bench-peers` builds it
  from the llama.cpp that llama-cpp-python vendors; without it, llama-cpp-python's `llama_cpp.server`, which
  serves one request at a time), at each concurrency C in
  --levels: aiperf's synthetic prompts (--isl tokens), --osl generated tokens each (`ignore_eos`), greedy,
  streamed; at least `--requests` requests and 4·C, after C warm-up requests. Reported: output tokens per
  second (all streams), time to first token and inter-token latency, p50 and p95.
- Two chat turns (`skipjack plain`, prefix cache on, then off): each conversation opens with a context of its
  own (--context tokens, aiperf's per-session user context) and a question; the second turn sends the whole
  history and a new question. Reported: each turn's TTFT (median over conversations), and the second turn's
  over the first's.

aiperf runs under `nice -n 19` with one worker and one record processor: on a 2-core machine its own processes
otherwise take about half the CPU from the server (figures in BENCHMARKS.md, "The server under load"). Its
tokenizer (it makes the synthetic prompts and counts the generated tokens; llama-server streams no usage) is
the model's, put in an HF-cache layout under --out (aiperf loads nothing else offline).

Output: `loadgen.json` and `loadgen.md` under --out. Timing depends on the machine: compare ratios in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from skipjack import schemas
from skipjack.bench.serve import LEVELS, _port, _start, peer, serve_command
from skipjack.errors import SkipjackError, run_command

AIPERF = "aiperf==0.13.0"  # what `make bench-serve` installs in .venv-aiperf
REVISION = "0" * 40  # the snapshot id of the tokenizer's HF-cache entry


def hf_cache(model: str, home: Path) -> str:
    """Put the model's tokenizer in an HF-cache layout under `home` (HF_HOME); returns its repo id."""
    from skipjack.loading.load import source_folder

    folder = source_folder(model)[0]
    repo = "skipjack/" + "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(model).stem)[:80]
    entry = home / "hub" / ("models--" + repo.replace("/", "--"))
    snap = entry / "snapshots" / REVISION
    snap.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        if (folder / name).exists():
            shutil.copy(folder / name, snap / name)
    (entry / "refs").mkdir(exist_ok=True)
    (entry / "refs" / "main").write_text(REVISION)
    return repo


def _metric(d, key: str, stat: str) -> float | None:
    """A statistic of aiperf's summary (`schemas.AiperfSummary`); None where it has none."""
    return getattr(d.metric(key), stat)


def aiperf(a, url: str, name: str, out: Path, clients: int, requests: int, turns: int = 1, quiet=True) -> dict:
    """One aiperf run; its summary and, per turn, the median TTFT (ms). `quiet`: niced, one worker, one record
    processor (False: as aiperf runs by default, to show what its own CPU use costs the server)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = ["nice", "-n", "19"] if quiet else []
    cmd += [a.aiperf, "profile", "--model", name, "--tokenizer", a.tokenizer]
    cmd += ["--url", url, "--endpoint-type", "chat", "--streaming", "--concurrency", str(clients)]
    cmd += ["--prompt-input-tokens-mean", str(a.isl), "--prompt-input-tokens-stddev", "0"]
    cmd += ["--prompt-output-tokens-mean", str(a.osl), "--prompt-output-tokens-stddev", "0"]
    cmd += ["--extra-inputs", "ignore_eos:true", "--extra-inputs", "temperature:0", "--random-seed", "1"]
    cmd += ["--workers-max", "1", "--record-processors", "1"] if quiet else []
    cmd += ["--no-server-metrics", "--no-gpu-telemetry", "--ui-type", "none", "--export-level", "records"]
    cmd += ["--output-artifact-dir", str(out)]
    if turns > 1:
        cmd += ["--conversation-num", str(requests), "--conversation-turn-mean", str(turns)]
        cmd += ["--conversation-turn-stddev", "0", "--user-context-prompt-length", str(a.context)]
    else:
        cmd += ["--request-count", str(requests), "--warmup-request-count", str(clients)]
    env = os.environ | {"HF_HOME": str(a.hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    summary = out / "profile_export_aiperf.json"
    if p.returncode != 0 or not summary.exists():
        raise SkipjackError(f"aiperf failed ({p.returncode}): {(p.stderr or p.stdout)[-400:]}")
    d = schemas.read_json("aiperf's summary", summary, schemas.AiperfSummary)
    if _metric(d, "request_error_rate", "avg"):
        raise SkipjackError(f"aiperf saw failed requests against {url}: {(d.model_extra or {}).get('error_summary')}")
    by_turn: dict[int, list[float]] = {}
    for i, line in enumerate((out / "profile_export.jsonl").read_text().splitlines()):
        r = schemas.loads(f"aiperf's record {i + 1}", line, schemas.AiperfRecord)
        ttft = r.metrics.get("time_to_first_token")
        if ttft is not None and ttft.value is not None and r.metadata.benchmark_phase == "profiling":
            by_turn.setdefault(r.metadata.turn_index, []).append(ttft.value)
    return {
        "clients": clients,
        "requests": int(_metric(d, "completed_request_count", "avg") or 0),
        "tok_s": _metric(d, "output_token_throughput", "avg"),
        "concurrency": _metric(d, "effective_concurrency", "avg"),
        **{
            f"{k}_{s}": _metric(d, m, s)
            for k, m in (("ttft", "time_to_first_token"), ("itl", "inter_token_latency"))
            for s in ("p50", "p95")
        },
        "ttft_by_turn": {t: statistics.median(v) for t, v in sorted(by_turn.items())},
    }


def _skipjack(a, port: int, method: str, cache_mb: int) -> list[str]:
    return serve_command(a.model, port, max(a.levels), "--method", method, "--prefix-cache-mb", str(cache_mb))


def _serving(cmd: list[str], port: int) -> tuple[subprocess.Popen, str, str]:
    """Start a server; (process, URL, the model name it serves), after one short warm-up request."""
    import httpx

    from skipjack.bench.serve import _one

    proc, url = _start(cmd, port)
    try:
        name = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        _one(url, [{"role": "user", "content": "Hello"}], 8, None)
    except BaseException:
        _stop(proc)
        raise
    return proc, url, name


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def run(a) -> dict:
    from skipjack.bench.machine import machine_info
    from skipjack.loading.load import NAMED, fetch_named

    res: dict = {
        "model": a.model,
        "isl": a.isl,
        "osl": a.osl,
        "context": a.context,
        "loadgen": AIPERF,
        "machine": machine_info(0.0),
        "runs": [],
        "turns": [],
    }
    gguf = fetch_named(a.model) if a.model in NAMED else Path(a.model)
    servers = [(f"skipjack {m}", lambda p, m=m: _skipjack(a, p, m, 0)) for m in a.methods]
    found = peer(gguf, max(a.levels)) if gguf.suffix == ".gguf" else None
    if found is None:
        res["llama_server"] = "not run: neither llama-server nor llama-cpp-python[server] is built (make bench-peers)"
    else:
        res["peer"] = found[0]
        servers.append(found)
    for label, make in servers:
        port = _port()
        proc, url, name = _serving(make(port), port)
        try:
            for c in a.levels:
                where = a.out / "aiperf" / label.replace(" ", "-") / str(c)
                r = aiperf(a, url, name, where, c, max(a.requests, 4 * c))
                res["runs"].append({"server": label} | r)
                print(json.dumps(res["runs"][-1]), file=sys.stderr)
            if label == "skipjack plain" and 2 in a.levels:  # the same level with aiperf as it runs by default
                r = aiperf(a, url, name, a.out / "aiperf" / "default-aiperf", 2, max(a.requests, 8), quiet=False)
                res["default_aiperf"] = {"server": label} | r
        finally:
            _stop(proc)
    for label, mb in (("prefix cache on", a.prefix_cache_mb), ("prefix cache off", 0)):
        port = _port()
        proc, url, name = _serving(_skipjack(a, port, "plain", mb), port)
        try:
            r = aiperf(a, url, name, a.out / "aiperf" / f"turns-{mb}", 1, a.conversations, turns=2)
            res["turns"].append({"server": f"skipjack plain, {label}"} | r)
            print(json.dumps(res["turns"][-1]), file=sys.stderr)
        finally:
            _stop(proc)
    return res


def table(res: dict) -> str:
    """The runs as markdown: throughput also as a ratio to the same server at one stream and to skipjack plain
    at the same concurrency; then the chat turns."""
    ms = lambda x: f"{x:.0f}" if x is not None else "-"  # noqa: E731
    ratio = lambda x, y: f"{x / y:.2f}" if x and y else "-"  # noqa: E731
    md = [
        "| server | streams | requests | tok/s | × one stream | × skipjack plain | TTFT p50 / p95 (ms) |"
        " ITL p50 / p95 (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    runs = res["runs"]
    for r in runs:
        one = next(
            (x for x in runs if x["server"] == r["server"] and x["clients"] == min(y["clients"] for y in runs)), r
        )
        plain = next((x for x in runs if x["server"] == "skipjack plain" and x["clients"] == r["clients"]), None)
        vs = ratio(r["tok_s"], plain["tok_s"]) if plain else "-"
        tok_s = ms(r["tok_s"]) if r["tok_s"] is None else f"{r['tok_s']:.1f}"
        md.append(
            f"| {r['server']} | {r['clients']} | {r['requests']} | {tok_s} | "
            f"{ratio(r['tok_s'], one['tok_s'])} | {vs} | {ms(r['ttft_p50'])} / {ms(r['ttft_p95'])} | "
            f"{ms(r['itl_p50'])} / {ms(r['itl_p95'])} |"
        )
    if res.get("llama_server"):
        md.append(f"\nllama-server: {res['llama_server']}")
    d = res.get("default_aiperf")
    if d:
        quiet = next(x for x in runs if x["server"] == d["server"] and x["clients"] == d["clients"])
        md.append(
            f"\naiperf as it runs by default (not niced, its default workers and record processors) against "
            f"{d['server']} at {d['clients']} streams: {d['tok_s']:.1f} tok/s, {ratio(d['tok_s'], quiet['tok_s'])}× "
            f"the quiet run's {quiet['tok_s']:.1f}; ITL p50 {ms(d['itl_p50'])} ms against {ms(quiet['itl_p50'])} ms."
        )
    md += [
        "",
        "| two chat turns | conversations | TTFT turn 1 (ms) | TTFT turn 2 (ms) | turn 2 / turn 1 |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in res["turns"]:
        t = {int(k): v for k, v in r["ttft_by_turn"].items()}
        md.append(
            f"| {r['server']} | {r['requests'] // 2} | {ms(t.get(0))} | {ms(t.get(1))} | {t[1] / t[0]:.2f} |"
            if 0 in t and 1 in t
            else f"| {r['server']} | - | - | - | - |"
        )
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m skipjack.bench.loadgen", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--aiperf", default=".venv-aiperf/bin/aiperf", help=f"the aiperf executable ({AIPERF})")
    ap.add_argument("--methods", default="plain,auto", help="comma list: each a server of its own")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrent streams per level")
    ap.add_argument("--isl", type=int, default=128, help="prompt tokens (aiperf's synthetic prompts)")
    ap.add_argument("--osl", type=int, default=64, help="generated tokens per request")
    ap.add_argument("--requests", type=int, default=16, help="requests per level at least (and 4 per stream)")
    ap.add_argument("--context", type=int, default=1024, help="tokens of each conversation's own context")
    ap.add_argument("--conversations", type=int, default=6)
    ap.add_argument("--prefix-cache-mb", type=int, default=512)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)

    def body() -> None:
        from skipjack import validate

        a.levels = [validate.integer("a level", int(x) if x.isdigit() else x, 1, 64) for x in a.levels.split(",")]
        a.methods = [m for m in a.methods.split(",") if m]
        if shutil.which(a.aiperf) is None:
            raise SkipjackError(f"aiperf not found at {a.aiperf!r}: `make bench-serve` installs {AIPERF} there")
        a.out = Path(a.out).expanduser()
        a.out.mkdir(parents=True, exist_ok=True)
        a.hf_home = a.out / "hf"
        a.tokenizer = hf_cache(a.model, a.hf_home)
        res = run(a)
        (a.out / "loadgen.json").write_text(json.dumps(res, indent=1))  # before the table: nothing measured is lost
        (a.out / "loadgen.md").write_text(md := table(res))
        print(md)

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
