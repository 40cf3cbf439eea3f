"""`skipjack bench`: time decoding methods and peer engines on a prompt suite; write results.json, REPORT.md, plots.

Procedure (results.json's schema: `skipjack.bench.schema`):

1. Validate everything before the slow model load: methods (`skipjack.methods.MethodSpec.parse`), peers, the
   suite or `--prompts` file, numbers, and that `--out` is writable (a probe file is written there).
2. Measure memory bandwidth once (copy of a ~512 MB float32 tensor, best of 3; read + write bytes).
3. Load the model as an `Engine`, tuned afresh (`skipjack.decoding.tuning`: the row padding and the verify-cost prior
   are measured in this run's conditions, not read from the cache); tokenize every prompt with its chat
   template. A prompt whose tokens plus the token budget exceed the model's context is skipped and listed
   under `skipped` with the reason.
4. Warm-up, excluded from the results: one short generation (8 tokens, shortest prompt) per method and peer,
   each method with a drafter made for it and thrown away after (no measured drafter has seen that prompt).
5. For each prompt, `--repeats` rounds; each round runs every job once, in an order rotated by one position
   per round (`rotated`), so no job always follows the same one (the first run after a peer that allocated
   gigabytes can pay for page faults; plain used to always run first). The median seconds of the repeats is
   kept. Interleaving prompt by prompt and round by round makes slow drift of the machine hit every method
   alike. Tokens, accepted-length statistics and forward passes come from the first repeat.

No compared method shares learned state with another: each has its own store (`Engine.new_method(own_store=
True)`), so a method run second on a prompt cannot find that prompt's answer learned by the one run first. A
method with a drafter (they learn: n-gram tables, acceptance rates, skip sets, draft costs) runs twice a round:
- cold (the headline: a run's top-level figures): a fresh drafter every time, what a user's first request sees;
- warm (`warm` in each run): the drafter as the method's runs on the earlier prompts left it, which has never
  seen the current prompt; each repeat starts from that state (a copy), and the state after the first repeat
  is carried on to the next prompt, as in a long-lived server.
Still shared: the engine's cost model (the machine's verify costs, learned from every timed forward pass,
plain's included; nothing of a prompt's text) and what a drafter keeps on disk (`swift`'s skip set).

A method spec may end in `@dtype` (`plain@bf16`, `ngram@bf16`): it then runs on the same model loaded in that
dtype, so one run compares precisions as ratios, with `plain` (the run's --dtype) as the reference for both.

`plain` is the reference for `speedup_vs_plain` and for `identical` (exact token-list equality with plain's
output on the same prompt, at temperature 0; null at T > 0). At T > 0 every run uses `--seed` (default 0).
Peak RSS is sampled every 20 ms and attributed to the method running then (the whole process: every loaded
model is included); after the runs, the plain step's breakdown (`steps`) and each engine's own peak RSS in
a child process (`footprint`) are measured.

Ctrl-C writes what has been measured so far with `"complete": false` and exits with status 130.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

from skipjack.bench import footprint, record
from skipjack.bench import peers as peers_mod
from skipjack.bench.benchmarks_md import write_report
from skipjack.bench.machine import RssSampler, machine_info, measure_bandwidth
from skipjack.bench.render import summary_text
from skipjack.bench.schema import SCHEMA_VERSION
from skipjack.bench.steps import breakdown
from skipjack.bench.suite import (
    load_prompts_file,
    load_suite,
    parse_methods,
    parse_peers,
    probe_out_dir,
    split_dtype,
)
from skipjack.errors import SkipjackError

WARMUP_TOKENS = 8


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help="named model, .gguf file, HF folder or hub id")
    p.add_argument(
        "--suite",
        default="quick",
        help="quick (6) | sample (18) | full (60) | humaneval (9 HumanEval problems) | code (quick + humaneval)",
    )
    p.add_argument(
        "--methods",
        default="plain,pld,ngram",
        help="comma list (e.g. plain,pld,pld:k=8; NAME@bf16 runs on the model in bf16) or 'all'",
    )
    peers = "hf,hf-pld,hf-assist,hf-early-exit,llamacpp,llamacpp-pld,llamacpp-draft"
    p.add_argument("--peers", default="", help=f"comma list of {peers}")
    p.add_argument("--max-new-tokens", "-n", type=int, default=256)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (identical_fraction needs it)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed at temperature > 0")
    p.add_argument("--prompts", default=None, help="JSONL file of your own prompts instead of --suite")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per prompt (median kept); >= 2")
    p.add_argument("--dtype", default="auto", help="auto (q4 for a GGUF) | q4 | q8 | fp32 | bf16")
    p.add_argument("--out", required=True, help="output folder for results.json, REPORT.md and plots")
    p.add_argument("--no-tune", action="store_true", help="run without tuning the kernels for this machine")


def _command(a) -> str:
    """The exact command line when run as `skipjack ...`; otherwise an equivalent one built from the args."""
    env = f"SKIPJACK_THREADS={shlex.quote(os.environ['SKIPJACK_THREADS'])} " if "SKIPJACK_THREADS" in os.environ else ""
    if Path(sys.argv[0]).name == "skipjack" and "bench" in sys.argv[1:]:
        return env + shlex.join(["skipjack", *sys.argv[1:]])
    parts = ["skipjack", "bench", "--suite", a.suite, "--methods", a.methods]
    for flag, val in (("--model", a.model), ("--peers", a.peers), ("--prompts", a.prompts)):
        if val:
            parts += [flag, val]
    parts += ["--max-new-tokens", str(a.max_new_tokens), "--temperature", str(a.temperature)]
    parts += ["--repeats", str(a.repeats), "--dtype", a.dtype, "--seed", str(a.seed), "--out", a.out]
    return env + shlex.join(parts)


def _check_numbers(a) -> None:
    from skipjack import validate

    if a.repeats < 2:
        raise SkipjackError(f"--repeats must be >= 2 (got {a.repeats}): the median of at least two runs is kept")
    validate.integer("--max-new-tokens", a.max_new_tokens, 1, 1 << 20)
    validate.number("--temperature", a.temperature, 0.0, float("inf"))
    validate.integer("--seed", a.seed, 0, 2**63 - 1)


class Bench:
    """Holds the engines, the methods' drafters and peers, and the runs measured so far."""

    def __init__(self, a, engines: dict, methods: list[str], peers: dict, prompts: list[tuple], sampler: RssSampler):
        from skipjack.decoding.sampling import SamplingParams

        self.a, self.methods, self.peers, self.prompts = a, methods, peers, prompts
        self.engines = engines  # dtype after a method's `@` (None: the run's) -> Engine
        self.tokenizer = engines[None].tokenizer
        # Each method made once with nothing learned, in a store of its own; every cold run gets a fork (forks
        # share the resources: models and heads, never what is learned), and so does the warm one, which learns on.
        self.blank = {m: engines[split_dtype(m)[1]].new_method(split_dtype(m)[0], own_store=True) for m in methods}
        self.drafters = {m: self.fresh(m) for m in methods}  # the warm methods: learned across the prompts
        stop = self.tokenizer.stop_ids
        seed = a.seed if a.temperature > 0 else None
        mk = lambda n: SamplingParams(temperature=a.temperature, seed=seed, max_new_tokens=n, stop_token_ids=stop)
        self.params, self.warm_params = mk(a.max_new_tokens), mk(min(WARMUP_TOKENS, a.max_new_tokens))
        self.sampler, self.runs, self.plain_tokens = sampler, [], {}
        self.live_peers = [n for n, p in peers.items() if p.status == "ok"]

    def fresh(self, method: str):
        """The method with nothing learned (a copy of its blank one: no state shared with any other method)."""
        return self.blank[method].fork()

    def _ours(self, method: str, ids: list[int], params, m=None) -> dict:
        from skipjack.engine import Request

        engine = self.engines[split_dtype(method)[1]]
        r = engine.complete(Request(ids, params, m or self.drafters[method]))
        return {
            "tokens": list(r.tokens),
            "seconds": r.seconds,
            "tokens_per_pass": r.tokens_per_pass,
            "accept_hist": {str(k): v for k, v in sorted(r.accept_hist.items())},
            "draft_steps": r.draft_steps,
            "forward_passes": r.forward_passes,
            "finish": r.finish,
            "prefill_seconds": r.prefill_seconds,
            "draft_seconds": r.draft_seconds,
        }

    def _peer(self, name: str, ids: list[int], params) -> dict:
        a, stop = self.a, self.tokenizer.stop_ids
        out = self.peers[name].run(ids, params.max_new_tokens, a.temperature, a.seed, stop)
        n = len(out.tokens)
        return {
            "tokens": out.tokens,
            "seconds": out.seconds,
            "tokens_per_pass": (n - 1) / out.forward_passes if out.forward_passes and n > 1 else 1.0,
            "accept_hist": {},
            "draft_steps": None,
            "forward_passes": out.forward_passes,
            "finish": "length" if n >= params.max_new_tokens else "stop",
            "prefill_seconds": out.prefill_seconds,  # llama.cpp's time to first token; null for HF
            "draft_seconds": None,
        }

    def one(self, name: str, ids: list[int], params, m=None) -> dict:
        self.sampler.label = name
        try:
            return self._peer(name, ids, params) if name in self.peers else self._ours(name, ids, params, m)
        finally:
            self.sampler.sample()
            self.sampler.label = None

    def jobs(self) -> list[tuple[str, str | None]]:
        """What one round runs: (method, "cold") and (method, "warm") for each method with a drafter, (name, None)
        for plain, the strategies and each peer that still runs."""
        out: list[tuple[str, str | None]] = []
        for m in self.methods:
            out += [(m, "cold"), (m, "warm")] if self.drafters[m].drafter is not None else [(m, None)]
        return out + [(n, None) for n in self.live_peers]

    def warm_up(self, progress, task) -> None:
        ids = min(self.prompts, key=lambda p: len(p[1]))[1]
        for name in [*self.methods, *self.live_peers]:
            progress.update(task, description=f"warm-up {name}")
            m = None if name in self.peers else self.fresh(name)  # thrown away: it has seen this prompt
            self._guard(name, lambda n=name, m=m: self.one(n, ids, self.warm_params, m))
            progress.advance(task)

    def _method(self, name: str, state: str | None, learned: dict, repeat: int):
        """The method object a job runs: a fresh one (cold), the learned one (warm: itself in the first repeat, so
        what it learns carries on; a copy of its state before the prompt in the others), or the bench's own."""
        if state == "cold":
            return self.fresh(name)
        if state == "warm" and repeat > 0:
            return learned[name].fork()
        return None

    def _guard(self, name: str, fn):
        """Run fn; a peer that raises is marked failed (and skipped from then on) instead of aborting."""
        if name not in self.peers:
            return fn()
        try:
            return fn()
        except Exception as e:
            self.peers[name] = peers_mod.Missing(name, f"failed: {type(e).__name__}: {str(e)[:120]}")
            self.live_peers.remove(name)
            self.runs = [r for r in self.runs if r["method"] != name]
            return None

    def measure(self, progress, task) -> None:
        for pi, (p, ids) in enumerate(self.prompts):
            jobs, R = self.jobs(), self.a.repeats
            # Every warm repeat starts from the same drafter state (an adaptive drafter must not learn the
            # answer in repeat 1 and replay it in repeat 2); the state after repeat 1 is kept.
            learned = {n: m.fork() for n, m in self.drafters.items() if m.drafter is not None}
            reps: dict[tuple, list[dict]] = {j: [] for j in jobs}
            for i in range(R):
                for name, state in rotated(jobs, pi * R + i):
                    if (name, state) not in self.jobs():  # a peer that failed (`_guard` dropped it from the jobs)
                        continue
                    label = f"{name} ({state})" if state else name
                    progress.update(task, description=f"{label} · {p.id} ({i + 1}/{R})")
                    m = self._method(name, state, learned, i)
                    r = self._guard(name, lambda n=name, x=ids, m=m: self.one(n, x, self.params, m))
                    progress.advance(task)
                    if r is not None:
                        reps[name, state].append(r)
            for name, state in jobs:  # plain first: it is the reference for `identical`
                if state == "warm" or (name, state) not in self.jobs() or len(reps[name, state]) < R:
                    continue
                run = self._record(p, name, ids, reps[name, state]) | {"drafter": state}
                if state == "cold":
                    run["warm"] = self._record(p, name, ids, reps[name, "warm"]) | {"drafter": "warm"}
                self.runs.append(run)
                if not progress.console.is_terminal:  # logs get one line per measurement instead of a bar
                    progress.console.print(_log_line(run), highlight=False, soft_wrap=True)

    def _record(self, p, name: str, ids: list[int], reps: list[dict]) -> dict:
        first = reps[0]
        secs = statistics.median(r["seconds"] for r in reps)
        if name == "plain":
            self.plain_tokens[p.id] = first["tokens"]
        ref = self.plain_tokens.get(p.id)
        identical = None if self.a.temperature > 0 or ref is None else first["tokens"] == ref
        return {
            "id": p.id,
            "category": p.category,
            "method": name,
            "kind": "peer" if name in self.peers else "method",
            "prompt_tokens": len(ids),
            "new_tokens": len(first["tokens"]),
            "seconds": secs,
            "seconds_all": [r["seconds"] for r in reps],
            "tokens_per_s": len(first["tokens"]) / secs if secs > 0 else 0.0,
            "prefill_seconds": None
            if first["prefill_seconds"] is None
            else statistics.median(r["prefill_seconds"] for r in reps),
            "identical": identical,
            "draft_seconds": None
            if first["draft_seconds"] is None
            else statistics.median(r["draft_seconds"] for r in reps),  # fmt: skip
            **{k: first[k] for k in ("tokens_per_pass", "accept_hist", "draft_steps", "forward_passes", "finish")},
            "tokens": first["tokens"],
        }


def _log_line(r: dict) -> str:
    line = (
        f"{r['method']} {r['id']}: {r['prompt_tokens']} prompt tokens, {r['new_tokens']} new tokens, "
        f"{r['seconds']:.2f} s median, {r['tokens_per_s']:.1f} tokens/s"
    )
    if r.get("warm"):
        line += f" cold; warm {r['warm']['tokens_per_s']:.1f} tokens/s"
    return line


def rotated(jobs: list, shift: int) -> list:
    """The jobs in a cyclic order that moves by one every round, so each job runs in each position (first after
    the previous prompt, right after a memory-hungry peer, ...) equally often over a run."""
    k = shift % len(jobs)
    return jobs[k:] + jobs[:k]


def _prepare_prompts(prompts, loaded, max_new: int) -> tuple[list[tuple], list[dict]]:
    ctx = loaded.model.config.max_position_embeddings
    kept, skipped = [], []
    for p in prompts:
        ids = loaded.tokenizer.prompt_ids(p.messages)
        if len(ids) + max_new > ctx:
            reason = f"prompt has {len(ids)} tokens + {max_new} new > the model's context {ctx}"
            skipped.append({"id": p.id, "category": p.category, "prompt_tokens": len(ids), "reason": reason})
        else:
            kept.append((p, ids))
    return kept, skipped


def _progress():
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    cols = [TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    return Progress(*cols, TextColumn("ETA"), TimeRemainingColumn(), console=Console(stderr=True))


def main(a) -> int:
    """Run the benchmark for parsed `bench` arguments; returns the exit status (130 when interrupted)."""
    from skipjack.engine import Engine
    from skipjack.loading.load import load_times, resolve_dtype

    _check_numbers(a)
    a.dtype, note = resolve_dtype(a.model, a.dtype)
    if note:
        print(note, file=sys.stderr)
    methods = parse_methods(a.methods)
    peer_names = parse_peers(a.peers)
    prompts = load_prompts_file(a.prompts) if a.prompts else load_suite(a.suite)
    out = probe_out_dir(a.out)
    results: dict = {"schema": SCHEMA_VERSION, "command": _command(a), "complete": False}
    results["machine"] = machine_info(measure_bandwidth())
    engine = Engine.load(a.model, a.dtype, tune=not a.no_tune, remeasure=True)  # tuned in this run's conditions
    loaded = engine.loaded
    times = load_times(a.model, a.dtype)
    kept, skipped = _prepare_prompts(prompts, loaded, a.max_new_tokens)
    results["linear_rows"] = engine.tuning.linear_rows() if engine.tuning else {}
    results["tuning"] = engine.tuning is not None
    if not kept:
        raise SkipjackError(f"no prompt fits the model's context ({skipped[0]['reason']})")
    n_ctx = min(loaded.model.config.max_position_embeddings, max(len(i) for _, i in kept) + a.max_new_tokens + 64)
    peers = peers_mod.make_peers(peer_names, loaded, a.dtype, n_ctx, a.seed)
    results |= record.run_record(a, loaded, times, methods, peer_names, kept, skipped)
    sampler = RssSampler()
    sampler.start()
    engines = _engines(a, engine, methods)
    results["model"]["weight_bytes_by_dtype"] = {d: e.loaded.weight_bytes for d, e in engines.items() if d}
    bench = Bench(a, engines, methods, peers, kept, sampler)
    interrupted = _run(bench)
    results["complete"] = not interrupted
    record.measured(results, bench, engine)
    results["step_breakdown"] = breakdown(engine.model)
    gguf = str(loaded.source) if any(n.startswith("llamacpp") for n in peer_names) else None
    results["footprint_mb"] = footprint.measure(a.model, [d for d in engines if d], gguf)
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    write_report(results, out)
    print(summary_text(results))
    print(f"wrote {out / 'results.json'}, {out / 'REPORT.md'} and plots")
    if interrupted:
        print("skipjack: interrupted: partial results written (complete: false)", file=sys.stderr)
        return 130
    return 0


def _engines(a, engine, methods: list[str]) -> dict:
    """dtype -> Engine: the run's engine (under None and its dtype), and the model loaded in each other dtype
    a `method@dtype` asks for."""
    from skipjack.engine import Engine

    others = {split_dtype(m)[1] for m in methods} - {None, a.dtype}
    engines = {None: engine, a.dtype: engine}
    engines |= {d: Engine.load(a.model, d, tune=not a.no_tune, remeasure=True) for d in sorted(others)}
    return engines


def _run(bench: Bench) -> bool:
    """Warm-up, then the measurements, under a progress bar; True when interrupted (Ctrl-C). Stops the RSS
    sampler and closes the peers either way."""
    try:
        with _progress() as progress:
            warm = progress.add_task("warm-up", total=len(bench.jobs()))
            bench.warm_up(progress, warm)
            progress.remove_task(warm)
            task = progress.add_task("bench", total=len(bench.prompts) * len(bench.jobs()) * bench.a.repeats)
            bench.measure(progress, task)
        return False
    except KeyboardInterrupt:
        return True
    finally:
        bench.sampler.stop()
        for p in bench.peers.values():
            p.close()
