"""`skipjack bench`: time decoding methods and peer engines on a prompt suite; write results.json, REPORT.md, plots.

Procedure (the schema of results.json is documented in `skipjack.bench.report`):

1. Validate everything before the slow model load: methods (`skipjack.drafters.make_drafter`), peers, the
   suite or `--prompts` file, numbers, and that `--out` is writable (a probe file is written there).
2. Measure memory bandwidth once (copy of a ~512 MB float32 tensor, best of 3; read + write bytes).
3. Load the model; tokenize every prompt with its chat template. A prompt whose tokens plus the token budget
   exceed the model's context is skipped and listed under `skipped` with the reason.
4. Warm-up, excluded from the results: the verify-cost prior is measured afresh (`skipjack.decode.cost_model`),
   then one short generation (8 tokens, shortest prompt) per method and peer.
5. For each prompt, `--repeats` rounds; each round runs every method and peer once, in an order rotated by one
   position per round (`rotated`), so no job always follows the same one (the first run after a peer that
   allocated gigabytes can pay for page faults; plain used to always run first). The median seconds
   of the repeats is kept. Interleaving prompt by prompt and round by round makes slow drift of the machine
   hit every method alike. Tokens, accepted-length statistics and forward passes come from the first repeat.

A method spec may end in `@dtype` (`plain@bf16`, `ngram@bf16`): it then runs on the same model loaded in that
dtype, so one run compares precisions as ratios, with `plain` (the run's --dtype) as the reference for both.

`plain` is the reference for `speedup_vs_plain` and for `identical` (exact token-list
equality with plain's output on the same prompt, at temperature 0; null at T > 0). One drafter object per
method is reused across prompts, so its online statistics carry over as in a long-lived server; each repeat
of a prompt starts from the same drafter state (a copy), so repeats are comparable.
At T > 0 every run uses `--seed` (default 0). Peak RSS is sampled every 20 ms by a background thread and
attributed to the method running at that moment (the whole process: every loaded model is included).

Ctrl-C writes what has been measured so far with `"complete": false` and exits with status 130.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

from skipjack.bench import peers as peers_mod
from skipjack.bench import report
from skipjack.bench.machine import RssSampler, machine_info, measure_bandwidth, peak_rss_mb
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
        "--suite", default="quick", help="quick (6 prompts) | sample (18: 3 per category of full) | full (60 prompts)"
    )
    p.add_argument(
        "--methods",
        default="plain,pld,ngram",
        help="comma list (e.g. plain,pld,pld:k=8; NAME@bf16 runs on the model in bf16) or 'all'",
    )
    p.add_argument("--peers", default="", help="comma list of hf,hf-pld,llamacpp,llamacpp-pld (default: none)")
    p.add_argument("--max-new-tokens", "-n", type=int, default=256)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (identical_fraction needs it)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed at temperature > 0")
    p.add_argument("--prompts", default=None, help="JSONL file of your own prompts instead of --suite")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per prompt (median kept); >= 2")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16")
    p.add_argument("--out", required=True, help="output folder for results.json, REPORT.md and plots")


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
    if a.repeats < 2:
        raise SkipjackError(f"--repeats must be >= 2 (got {a.repeats}): the median of at least two runs is kept")
    if a.max_new_tokens < 1:
        raise SkipjackError(f"--max-new-tokens must be >= 1 (got {a.max_new_tokens})")
    if a.temperature < 0:
        raise SkipjackError(f"--temperature must be >= 0 (got {a.temperature})")


class Bench:
    """Holds the loaded model, drafters and peers, and the runs measured so far."""

    def __init__(
        self, a, loaded, methods: list[str], peers: dict, prompts: list[tuple], sampler: RssSampler, models=None
    ):
        from skipjack.drafters import make_drafter
        from skipjack.sampling import SamplingParams

        self.a, self.loaded, self.methods, self.peers, self.prompts = a, loaded, methods, peers, prompts
        self.models = models or {None: loaded}  # dtype after a method's `@` (None: the run's) -> Loaded
        self.drafters = {m: make_drafter(split_dtype(m)[0]) for m in methods}
        stop = loaded.tokenizer.stop_ids
        seed = a.seed if a.temperature > 0 else None
        mk = lambda n: SamplingParams(temperature=a.temperature, seed=seed, max_new_tokens=n, stop_token_ids=stop)
        self.params, self.warm_params = mk(a.max_new_tokens), mk(min(WARMUP_TOKENS, a.max_new_tokens))
        self.sampler, self.runs, self.plain_tokens = sampler, [], {}
        self.live_peers = [n for n, p in peers.items() if p.status == "ok"]

    def _ours(self, method: str, ids: list[int], params, drafter=None) -> dict:
        from skipjack import api

        spec, dtype = split_dtype(method)
        r = api.complete(self.models[dtype], ids, params, spec, drafter=drafter or self.drafters[method])
        return {
            "tokens": list(r.tokens),
            "seconds": r.seconds,
            "mean_accepted": r.mean_accepted,
            "accept_hist": {str(k): v for k, v in sorted(r.accept_hist.items())},
            "draft_steps": r.draft_steps,
            "forward_passes": r.forward_passes,
            "finish": r.finish,
            "prefill_seconds": r.prefill_seconds,
        }

    def _peer(self, name: str, ids: list[int], params) -> dict:
        a, stop = self.a, self.loaded.tokenizer.stop_ids
        out = self.peers[name].run(ids, params.max_new_tokens, a.temperature, a.seed, stop)
        n = len(out.tokens)
        return {
            "tokens": out.tokens,
            "seconds": out.seconds,
            "mean_accepted": (n - 1) / out.forward_passes if out.forward_passes and n > 1 else 1.0,
            "accept_hist": {},
            "draft_steps": None,
            "forward_passes": out.forward_passes,
            "finish": "length" if n >= params.max_new_tokens else "stop",
            "prefill_seconds": None,  # peers do not report their time to first token
        }

    def one(self, name: str, ids: list[int], params, drafter=None) -> dict:
        self.sampler.label = name
        try:
            return self._peer(name, ids, params) if name in self.peers else self._ours(name, ids, params, drafter)
        finally:
            self.sampler.sample()
            self.sampler.label = None

    def jobs(self) -> list[str]:
        return [*self.methods, *self.live_peers]

    def warm_up(self, progress, task) -> None:
        from skipjack import decode

        speculative = {split_dtype(m)[1] for m in self.methods if split_dtype(m)[0] != "plain"}
        for dtype in speculative:  # a prior measured in this run's conditions (per model), not cached
            progress.update(task, description="measuring the verify-cost prior")
            decode.cost_model(self.models[dtype].model, remeasure=True)
        ids = min(self.prompts, key=lambda p: len(p[1]))[1]
        for name in self.jobs():
            progress.update(task, description=f"warm-up {name}")
            self._guard(name, lambda n=name: self.one(n, ids, self.warm_params))
            progress.advance(task)

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
            # Every repeat starts from the same drafter state (an adaptive drafter must not learn the
            # answer in repeat 1 and replay it in repeat 2); the state after repeat 1 is kept.
            snaps = {n: copy.deepcopy(self.drafters[n]) for n in jobs if n in self.drafters}
            reps: dict[str, list[dict]] = {n: [] for n in jobs}
            for i in range(R):
                for name in rotated(jobs, pi * R + i):
                    if name not in self.jobs():  # a peer that failed (`_guard` dropped it from the jobs)
                        continue
                    progress.update(task, description=f"{name} · {p.id} ({i + 1}/{R})")
                    d = copy.deepcopy(snaps[name]) if i > 0 and name in snaps else None
                    r = self._guard(name, lambda n=name, x=ids, d=d: self.one(n, x, self.params, d))
                    progress.advance(task)
                    if r is not None:
                        reps[name].append(r)
            for name in jobs:  # plain first: it is the reference for `identical`
                if name in self.jobs() and len(reps[name]) == R:
                    self.runs.append(self._record(p, name, ids, reps[name]))
                    if not progress.console.is_terminal:  # logs get one line per measurement instead of a bar
                        r = self.runs[-1]
                        progress.console.print(
                            f"{name} {p.id}: {r['prompt_tokens']} prompt tokens, {r['new_tokens']} new tokens, "
                            f"{r['seconds']:.2f} s median, {r['tokens_per_s']:.1f} tokens/s",
                            highlight=False,
                            soft_wrap=True,
                        )

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
            **{k: first[k] for k in ("mean_accepted", "accept_hist", "draft_steps", "forward_passes", "finish")},
            "tokens": first["tokens"],
        }


def rotated(jobs: list[str], shift: int) -> list[str]:
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
    from skipjack.loading import load, load_times

    _check_numbers(a)
    methods = parse_methods(a.methods)
    peer_names = parse_peers(a.peers)
    prompts = load_prompts_file(a.prompts) if a.prompts else load_suite(a.suite)
    out = probe_out_dir(a.out)
    results: dict = {"schema": report.SCHEMA_VERSION, "command": _command(a), "complete": False}
    results["machine"] = machine_info(measure_bandwidth())
    loaded = load(a.model, a.dtype)
    times = load_times(a.model, a.dtype)
    kept, skipped = _prepare_prompts(prompts, loaded, a.max_new_tokens)
    from skipjack.bench.rows import linear_rows

    results["linear_rows"] = linear_rows(loaded.model)  # measures the row padding afresh and applies it
    if not kept:
        raise SkipjackError(f"no prompt fits the model's context ({skipped[0]['reason']})")
    n_ctx = min(loaded.model.config.max_position_embeddings, max(len(i) for _, i in kept) + a.max_new_tokens + 64)
    peers = peers_mod.make_peers(peer_names, loaded, a.dtype, n_ctx, a.seed)
    results |= {
        "model": {
            "name": loaded.name,
            "source": str(loaded.source),
            "dtype": a.dtype,
            "weight_bytes": loaded.weight_bytes,
            "params": sum(p.numel() for p in loaded.model.parameters()),
            "context": loaded.model.config.max_position_embeddings,
            "load_seconds": round(loaded.seconds, 3),
            "load_cold_s": times["cold_s"],  # GGUF -> conversion cache -> model, into an empty cache
            "load_warm_s": times["warm_s"],  # from the conversion cache
        },
        "suite": "custom" if a.prompts else a.suite,
        "prompts_file": a.prompts,
        "settings": {
            "methods": methods,
            "peers": peer_names,
            "max_new_tokens": a.max_new_tokens,
            "temperature": a.temperature,
            "seed": a.seed,
            "repeats": a.repeats,
        },
        "prompts": [{"id": p.id, "category": p.category, "prompt_tokens": len(i)} for p, i in kept],
        "skipped": skipped,
    }
    sampler = RssSampler()
    sampler.start()
    others = {split_dtype(m)[1] for m in methods} - {None, a.dtype}  # `method@dtype`: the model in that dtype too
    models = {None: loaded, a.dtype: loaded} | {d: load(a.model, d) for d in sorted(others)}
    results["model"]["weight_bytes_by_dtype"] = {d: m.weight_bytes for d, m in models.items() if d}
    bench = Bench(a, loaded, methods, peers, kept, sampler, models)
    interrupted = False
    try:
        with _progress() as progress:
            warm = progress.add_task("warm-up", total=len(bench.jobs()))
            bench.warm_up(progress, warm)
            progress.remove_task(warm)
            task = progress.add_task("bench", total=len(kept) * len(bench.jobs()) * a.repeats)
            bench.measure(progress, task)
        results["complete"] = True
    except KeyboardInterrupt:
        interrupted = True
    finally:
        sampler.stop()
        for p in peers.values():
            p.close()
    results["peers"] = {
        n: {"status": bench.peers[n].status, "weight_bytes": _peer_weights(bench.peers[n])} for n in peers
    }
    results["peak_rss_mb"] = round(peak_rss_mb(), 1)
    results["runs"] = bench.runs
    results["cost_curves"] = _cost_curves(loaded.model)
    results["summary"] = report.summarise(results, sampler.peaks)
    (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    report.write_report(results, out)
    print(report.summary_text(results))
    print(f"wrote {out / 'results.json'}, {out / 'REPORT.md'} and plots")
    if interrupted:
        print("skipjack: interrupted: partial results written (complete: false)", file=sys.stderr)
        return 130
    return 0


def _cost_curves(model) -> list[dict] | None:
    """The verify-cost curves the speculative methods' shared cost model learned during the run (None if no
    method used it)."""
    from skipjack import decode

    cm = decode.learned_cost_model(model)
    return None if cm is None else cm.curves()


def _peer_weights(peer) -> int | None:
    if isinstance(peer, peers_mod.HFPeer):
        return sum(p.numel() * p.element_size() for p in peer.model.parameters())
    if isinstance(peer, peers_mod.LlamaCppPeer):
        return Path(peer.llm.model_path).stat().st_size
    return None
