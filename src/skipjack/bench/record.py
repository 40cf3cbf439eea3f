"""What results.json records about a bench run besides the timings: the run itself (model, suite, settings,
prompts), and after the runs the peers' status, peak RSS, the learned cost curves, the drafters' choices and
the summary (`skipjack.bench.schema.Results`)."""

from __future__ import annotations

import json

from skipjack.bench import peers as peers_mod
from skipjack.bench.machine import peak_rss_mb
from skipjack.bench.suite import split_dtype
from skipjack.bench.summary import summarise


def run_record(a, loaded, times: dict, methods: list[str], peer_names: list[str], kept, skipped) -> dict:
    """What the run is: model, suite, settings, the prompts run and those skipped (`schema.Results`)."""
    return {
        "model": model_record(loaded, a.dtype, times),
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


def measured(results: dict, bench, engine) -> None:
    """The measured part of results.json: peers' status, peak RSS, runs, the learned cost curves, the summary."""
    weights = peers_mod.weight_bytes
    results["peers"] = {n: {"status": p.status, "weight_bytes": weights(p)} for n, p in bench.peers.items()}
    results["peak_rss_mb"] = round(peak_rss_mb(), 1)
    results["runs"] = bench.runs
    sized = any(m.drafter is not None and not m.spec.k for n, m in bench.drafters.items() if split_dtype(n)[1] is None)
    results["cost_curves"] = engine.cost.curves() if sized else None  # what the run's shared cost model learned
    results["drafters"] = {  # what each model-based drafter chose by the end of the run (skip set, exit layer)
        n: jsonable(d) for n, m in bench.drafters.items() if (d := m.drafter_description())
    }
    results["summary"] = summarise(results, bench.sampler.peaks)


def jsonable(x):
    """A drafter's description as JSON values (tuples and sets become lists)."""
    return json.loads(json.dumps(x, default=lambda o: sorted(o) if isinstance(o, set | frozenset) else str(o)))


def model_record(loaded, dtype: str, times: dict) -> dict:
    return {
        "name": loaded.name,
        "source": str(loaded.source),
        "dtype": dtype,
        "weight_bytes": loaded.weight_bytes,
        "params": loaded.params,
        "context": loaded.model.config.max_position_embeddings,
        "load_seconds": round(loaded.seconds, 3),
        "load_cold_s": times["cold_s"],  # GGUF -> conversion cache -> model, into an empty cache
        "load_warm_s": times["warm_s"],  # from the conversion cache
    }
