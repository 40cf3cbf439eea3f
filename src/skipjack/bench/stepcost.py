"""What a decoding pass costs: the plain step's breakdown on the native and the Python path, and the verify-cost
curve c(k) (a pass over k new tokens, in one-token steps) at two contexts, beside llama.cpp's on the same GGUF.

    python -m skipjack.bench.stepcost --model smollm2-135m --out bench-out/stepcost

A lossless method's speedup is (tokens per pass) / (c(k) + drafting), so c(k) decides what speculation can
win. Ours is the native step's pass over k rows with logits for every row, from a cache holding `context`
tokens (the pass's keys trimmed after each timing). llama.cpp (llama-cpp-python, after `make bench-peers`)
computes logits for every row too (`logits_all`), as a verify pass needs; its cache is cut back to the context
before each pass. Each figure is the median of `repeats` passes (the k cycled within a repeat), one engine's
runs after the other's (an engine's threads may still spin after its pass, which would slow the other's).
Writes stepcost.json (with the machine header) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

KS = (1, 2, 4, 8, 16)
CONTEXTS = (256, 2048)


class Ours:
    """Passes over k new tokens on a cache prefilled with `context` tokens."""

    def __init__(self, model, context: int):
        self.model, self.V = model, model.config.vocab_size
        self.cache = model.make_cache(context + max(KS) + 8)
        model(torch.arange(context)[None] % self.V, self.cache, logits="none")

    def seconds(self, k: int) -> float:
        ids = torch.randint(0, self.V, (1, k))
        t0 = time.perf_counter()
        self.model(ids, self.cache, logits="all")
        dt = time.perf_counter() - t0
        self.cache.trim(k)
        return dt


class LlamaCpp:
    """The same on llama.cpp: logits for every row, the cache cut back to the context before each pass."""

    def __init__(self, gguf: Path, context: int, vocab: int):
        from llama_cpp import Llama

        threads = torch.get_num_threads()
        self.llm = Llama(
            model_path=str(gguf), n_ctx=context + max(KS) + 8, n_threads=threads, n_threads_batch=threads,
            logits_all=True, verbose=False,
        )  # fmt: skip
        self.context, self.V = context, vocab
        self.llm.eval([i % vocab for i in range(context)])

    def seconds(self, k: int) -> float:
        self.llm.n_tokens = self.context  # eval drops the cache's keys past n_tokens
        toks = torch.randint(0, self.V, (k,)).tolist()
        t0 = time.perf_counter()
        self.llm.eval(toks)
        return time.perf_counter() - t0

    def close(self) -> None:
        getattr(self.llm, "close", lambda: None)()


def curves(model, gguf: Path | None, contexts=CONTEXTS, ks=KS, repeats: int = 9) -> dict:
    """{context: {"ours": {k: ms}, "llamacpp": {k: ms} or absent, "c_ours": {k: c}, "c_llamacpp": ...}}."""
    out = {}
    for ctx in contexts:
        runners = {"ours": Ours(model, ctx)}
        if gguf is not None:
            runners["llamacpp"] = LlamaCpp(gguf, ctx, model.config.vocab_size)
        times: dict[str, dict[int, list[float]]] = {name: {k: [] for k in ks} for name in runners}
        for name, r in runners.items():  # one engine at a time: the other's threads may spin after its pass
            r.seconds(1)  # warm
            for _ in range(repeats):
                for k in ks:
                    times[name][k].append(r.seconds(k))
        row = {}
        for name in runners:
            ms = {k: statistics.median(times[name][k]) * 1000 for k in ks}
            row[name] = {k: round(v, 3) for k, v in ms.items()}
            row["c_" + name] = {k: round(v / ms[ks[0]], 3) for k, v in ms.items()}
        if "llamacpp" in runners:
            runners["llamacpp"].close()
        out[ctx] = row
    return out


def breakdowns(model) -> dict:
    """The plain step's breakdown (`skipjack.bench.steps`) on the native path and on the Python path."""
    from skipjack.bench.steps import breakdown
    from skipjack.models import native

    out = {}
    for name, on in (("native", True), ("python", False)):
        with native.switched(on):
            out[name] = breakdown(model)
    return out


def table(result: dict) -> str:
    lines = []
    b = result["breakdown"]
    for name, r in b.items():
        lines.append(
            f"plain step at {r['context']} tokens, {name} path: {r['total_ms']} ms = linears {r['linears_ms']} "
            f"+ attention {r['attention_ms']} + the rest {r['other_ms']}"
        )
    for ctx, row in result["curves"].items():
        lines.append(f"context {ctx}: k = " + " / ".join(str(k) for k in row["ours"]))
        for name in ("ours", "llamacpp"):
            if name in row:
                ms = " / ".join(f"{v:.2f}" for v in row[name].values())
                c = " / ".join(f"{v:.2f}" for v in row["c_" + name].values())
                lines.append(f"  {name:9s} ms {ms}   c(k) {c}")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """One model's run as BENCHMARKS.md shows it: the header, the breakdowns, the c(k) table."""
    m = result["machine"]
    isa = ", ".join(m.get("isa", [])) or "unknown"
    md = f"### {result['model']} ({result['dtype']})\n\n"
    md += (
        f"{m['cpu']}, {m['threads']} threads, instruction sets {isa} (kernels: {m.get('kernels_isa')}); "
        f"llama.cpp: {m.get('llama_cpp_build') or 'none'}; "
        f"{m['date']}. Command: `python -m skipjack.bench.stepcost --model {result['model']}`.\n\n"
    )
    md += "| path | one-token step at 256 (ms) | linears | attention | the rest | the rest, share |\n"
    md += "|---|---|---|---|---|---|\n"
    for name, b in result["breakdown"].items():
        share = b["other_ms"] / b["total_ms"] if b["total_ms"] else 0.0
        md += (
            f"| {name} | {b['total_ms']:.2f} | {b['linears_ms']:.2f} | {b['attention_ms']:.2f} | {b['other_ms']:.2f} "
            f"| {share:.0%} |\n"
        )
    phases = result["breakdown"].get("native", {}).get("phases_ms")
    if phases:
        md += "\nNative step by phase (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items()) + ".\n"
    md += "\nA pass over k new tokens (logits for every row), in ms and in one-token passes c(k):\n\n"
    for ctx, row in result["curves"].items():
        ks = list(row["ours"])
        md += f"\n| context {ctx} | " + " | ".join(f"k={k}" for k in ks) + " |\n|---|" + "---|" * len(ks) + "\n"
        for name in ("ours", "llamacpp"):
            if name in row:
                label = "skipjack (native)" if name == "ours" else "llama.cpp"
                md += f"| {label} ms | " + " | ".join(f"{row[name][k]:.2f}" for k in ks) + " |\n"
                md += f"| {label} c(k) | " + " | ".join(f"{row['c_' + name][k]:.2f}" for k in ks) + " |\n"
        if "llamacpp" in row:
            ratio = row["ours"][ks[0]] / row["llamacpp"][ks[0]]
            md += f"\nOne-token pass at context {ctx}: skipjack {ratio:.2f}× llama.cpp's time.\n"
    return md


def main(argv: list[str] | None = None) -> int:
    from skipjack.bench.machine import machine_info, measure_bandwidth
    from skipjack.errors import run_command
    from skipjack.loading.load import load

    ap = argparse.ArgumentParser(prog="python -m skipjack.bench.stepcost", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--no-peer", action="store_true", help="leave llama.cpp out")
    ap.add_argument("--out", default="bench-out/stepcost")
    a = ap.parse_args(argv)

    def body() -> None:
        loaded = load(a.model)
        gguf = None
        if not a.no_peer:
            try:
                import llama_cpp  # noqa: F401

                gguf = loaded.source if loaded.source.suffix == ".gguf" else None
            except ImportError:
                print("skipjack: llama-cpp-python is not installed (make bench-peers): ours only", file=sys.stderr)
        contexts = [int(c) for c in a.contexts.split(",")]
        result = {
            "machine": machine_info(measure_bandwidth()),
            "model": a.model,
            "dtype": loaded.dtype,
            "breakdown": breakdowns(loaded.model),
            "curves": curves(loaded.model, gguf, contexts, KS, a.repeats),
        }
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "stepcost.json").write_text(json.dumps(result, indent=1) + "\n")
        print(table(result))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
