"""`skipjack eval --method M --model M --dtype D --out DIR [--quick]`: one row of the quality table.

A lossy method (`skipjack.strategies`, or a lower dtype) is compared with the exact model: plain decoding of
the same model at the reference dtype (`--reference-dtype`, default the same dtype). Measured on one run:

1. **Perplexity, teacher-forced, on local text** (`texts`: pydoc topics and stdlib sources the benchmark
   prompts do not use; fixed windows). Each window is a prompt part, run by the exact model (as a prompt is
   in decoding), and a continuation that the method runs exactly as it decodes (a strategy's `forward` from
   generated index 0, in one pass): perplexity of the continuation = exp(mean NLL), for the method and the
   reference; next-token top-1 agreement and mean KL(reference || method) over the same positions.
2. **Greedy outputs on the benchmark prompts**: plain and the method alternate prompt by prompt (drift on a
   shared machine hits both); the share of outputs identical to plain's, and the decoding speed ratio.
3. **A task score**: HumanEval pass@1 (`humaneval`) for code models, the self-checking task (`selfcheck`)
   otherwise; plain's outcomes are kept under DIR and reused by later rows of the same model and settings.

`--quick`: 16 windows of 96 + 128 tokens, the quick suite at 64 new tokens, 14 HumanEval problems (every 12th)
or 24 self-check items; full: 64 windows, the sample suite (18 prompts) at 128 tokens, all 164 / 47.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from skipjack import methods, store
from skipjack.decoding.sampling import SamplingParams
from skipjack.engine import Engine, Request
from skipjack.errors import SkipjackError
from skipjack.evaluation.common import continuation_logprobs, label, slug
from skipjack.methods import MethodSpec

FORMAT = 1


@dataclass(frozen=True)
class Settings:
    windows: int
    prompt: int
    cont: int
    suite: str
    tokens: int
    humaneval_every: int
    selfcheck_items: int | None
    task_tokens: int = 384


QUICK = Settings(16, 96, 128, "quick", 64, 12, 24)
FULL = Settings(64, 96, 128, "sample", 128, 1, None)


def task_kind(model: str, task: str) -> str:
    if task != "auto":
        return task
    return "humaneval" if "coder" in model.lower() else "selfcheck"


@torch.inference_mode()
def perplexity(model, spec: str, ref, windows: list[tuple[list[int], list[int]]], tokenizer=None) -> dict:
    """Sums over the windows' continuations: NLL under the method and the reference, top-1 agreement, KL."""
    sums = {"tokens": 0, "nll": 0.0, "nll_ref": 0.0, "agree": 0, "kl": 0.0}
    ms = MethodSpec.parse(spec)
    method_strategy = methods.strategy(ms, tokenizer)  # begun afresh per window
    for prompt, cont in windows:
        lp = continuation_logprobs(ref, None, prompt, cont)  # [C, V]
        lq = continuation_logprobs(model, method_strategy, prompt, cont)  # [C, V]
        t = torch.tensor(cont)[:, None]  # [C, 1]
        sums["tokens"] += len(cont)
        sums["nll_ref"] -= lp.gather(1, t).sum().item()
        sums["nll"] -= lq.gather(1, t).sum().item()
        sums["agree"] += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        sums["kl"] += (lp.exp() * (lp - lq)).sum().item()
    n = max(1, sums["tokens"])
    return {
        "windows": len(windows),
        "tokens": sums["tokens"],
        "ppl": math.exp(sums["nll"] / n),
        "ppl_ref": math.exp(sums["nll_ref"] / n),
        "ppl_increase": math.exp((sums["nll"] - sums["nll_ref"]) / n) - 1,
        "top1_agreement": sums["agree"] / n,
        "kl": sums["kl"] / n,
    }


def greedy(engine: Engine, spec: str, ref: Engine, prompts: list, tokens: int) -> dict:
    """Plain (on `ref`) and the method alternate per prompt; identical share and speed ratios."""
    tok = engine.tokenizer
    rows, same, skipped = [], 0, {}
    engine.complete(Request(tok.prompt_ids("Hello")[:8], SamplingParams(max_new_tokens=4), spec))  # warm-up
    for i, p in enumerate(prompts):
        ids = tok.prompt_ids(p.messages)
        params = SamplingParams(max_new_tokens=tokens, stop_token_ids=tok.stop_ids)
        order = [("plain", ref), (spec, engine)] if i % 2 == 0 else [(spec, engine), ("plain", ref)]
        res = {name: e.complete(Request(list(ids), params, name)) for name, e in order}
        a, b = res["plain"], res[spec]
        same += a.tokens == b.tokens
        for k, v in b.layers.items():  # a lossy layer strategy's stats, per request: summed over the prompts
            if k == "tokens" or k.endswith("_share"):
                skipped[k] = skipped.get(k, 0) + (v * b.layers["tokens"] if k.endswith("_share") else v)
        rows.append({"id": p.id, "plain": _speed(a), "method": _speed(b), "identical": a.tokens == b.tokens})
    tot = lambda k, f: sum(r[k][f] for r in rows)  # noqa: E731
    return {
        "prompts": len(rows),
        "identical": same,
        "identical_share": same / max(1, len(rows)),
        "tok_s_plain": tot("plain", "tokens") / tot("plain", "seconds"),
        "tok_s": tot("method", "tokens") / tot("method", "seconds"),
        "speedup": (tot("method", "tokens") / tot("method", "seconds"))
        / (tot("plain", "tokens") / tot("plain", "seconds")),
        "decode_speedup": (tot("method", "decode_tokens") / tot("method", "decode_seconds"))
        / (tot("plain", "decode_tokens") / tot("plain", "decode_seconds")),
        "rows": rows,
        "skipped": {k: v / max(1, skipped["tokens"]) if k != "tokens" else v for k, v in skipped.items()} or None,
    }


def _speed(r) -> dict:
    return {
        "tokens": r.new_tokens,
        "seconds": r.seconds,
        "decode_tokens": max(0, r.new_tokens - 1),
        "decode_seconds": max(1e-9, r.seconds - r.prefill_seconds),
    }


def task(engine: Engine, spec: str, ref: Engine, kind: str, s: Settings, cache: Path) -> dict:
    """The task's score for the method and for plain (plain's outcomes reused from `cache` when there)."""
    from skipjack.evaluation import humaneval, selfcheck

    if kind == "humaneval":
        items = [{"id": p["task_id"], "problem": p} for p in humaneval.problems(s.humaneval_every)]
    elif kind == "selfcheck":
        items = selfcheck.items(s.selfcheck_items)
    else:
        return {"name": "none"}
    key = {"format": FORMAT, "kind": kind, "items": [i["id"] for i in items], "tokens": s.task_tokens}
    plain = _read(cache) if cache.exists() else None
    plain = plain["outcomes"] if plain and plain.get("key") == key else None
    out = {"name": kind, "items": len(items)}
    for role, name, e in ([] if plain else [("ref", "plain", ref)]) + [("method", spec, engine)]:
        got = []
        for it in items:
            if kind == "humaneval":
                ids = e.tokenizer.prompt_ids(it["problem"]["prompt"], raw=True)
                params = SamplingParams(max_new_tokens=s.task_tokens, stop_token_ids=e.tokenizer.stop_ids)
                text = e.complete(Request(ids, params, name, humaneval.STOPS)).text
                outcome = humaneval.passes(it["problem"], text)
                got.append(outcome.passed)
                out["confinement"] = outcome.confinement
            else:
                ids = e.tokenizer.prompt_ids(it["prompt"])
                params = SamplingParams(max_new_tokens=48, stop_token_ids=e.tokenizer.stop_ids)
                got.append(selfcheck.check(it, e.complete(Request(ids, params, name)).text))
        if role == "ref":
            plain = got
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"key": key, "outcomes": got}))
        else:
            out["score"] = sum(got) / len(got)
            out["agreement"] = sum(a == b for a, b in zip(got, plain)) / len(got)
    out["score_plain"] = sum(plain) / len(plain)
    return out


def _read(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def evaluate(
    model: str,
    spec: str,
    dtype: str,
    out: Path,
    quick: bool,
    task_name: str,
    ref_dtype: str | None,
    ref_model: str | None = None,
) -> dict:
    """One row: loads the model (and the reference, if another model or dtype), measures, writes DIR/<row>.json."""
    from skipjack.bench.machine import machine_info
    from skipjack.bench.suite import load_suite
    from skipjack.evaluation.texts import windows

    s = QUICK if quick else FULL
    if MethodSpec.parse(spec).superposed_class is not None:  # a bad spec fails before the load (nothing built)
        raise SkipjackError(
            "skipjack eval's teacher-forced measures do not apply to superposed (its drafts share one stream): "
            "python -m skipjack.bench.superposed measures its completions"
        )
    engine = Engine.load(model, dtype)
    same = ref_dtype in (None, dtype) and ref_model in (None, model)
    ref = engine if same else Engine.load(ref_model or model, ref_dtype or dtype)
    t0 = time.perf_counter()
    kind = task_kind(engine.name, task_name)
    row = {
        "format": FORMAT,
        "model": label(engine.name),
        "dtype": dtype,
        "reference_model": label(ref.name),
        "reference_dtype": ref_dtype or dtype,
        "method": spec,
        "lossless": MethodSpec.parse(spec).lossless and same,
        "quick": quick,
        "settings": asdict(s),
        "machine": machine_info(0.0),
    }
    row["perplexity"] = perplexity(
        engine.model, spec, ref.model, windows(engine.tokenizer, s.windows, s.prompt, s.cont), engine.tokenizer
    )
    row["greedy"] = greedy(engine, spec, ref, load_suite(s.suite), s.tokens)
    row["skipped"] = row["greedy"].pop("skipped")
    ref_file = out / f"plain-{slug(label(ref.name))}-{ref_dtype or dtype}-{kind}-{'quick' if quick else 'full'}.json"
    row["task"] = task(engine, spec, ref, kind, s, ref_file)
    row["seconds"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{slug(label(engine.name))}__{slug(spec)}__{dtype}.json"
    with store.atomic_file(path) as tmp:
        tmp.write_text(json.dumps(row, indent=1))
    row["path"] = str(path)
    return row


def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="a named model, a GGUF or a checkpoint folder (default: smollm2-135m)")
    p.add_argument("--method", default="plain", help="the method to measure (ffn-skip, layer-skip:ratio=0.25, ...)")
    p.add_argument("--dtype", default="auto", help="the method's dtype (auto: q4 for a GGUF)")
    p.add_argument(
        "--reference-dtype", default=None, help="the exact model's dtype to compare with (default: the same)"
    )
    p.add_argument(
        "--reference",
        default=None,
        help="the exact model to compare with (default: --model; for a quantization artefact, its source)",
    )
    p.add_argument("--task", default="auto", choices=["auto", "humaneval", "selfcheck", "none"])
    p.add_argument("--quick", action="store_true", help="minutes, not the benchmark's full run")
    p.add_argument("--out", required=True, help="folder for the row's JSON (and plain's reusable task outcomes)")
    h = p.add_argument_group("lm-evaluation-harness (`skipjack.evaluation.lmeval`; needs lm-eval)")
    h.add_argument(
        "--lm-eval",
        default=None,
        metavar="TASKS",
        help="score lm-eval tasks instead: comma-separated task files, folders or names "
        "(bundled: skipjack_capitals, skipjack_capitals_gen, skipjack_arith); with plain beside a lossy method",
    )
    h.add_argument("--server", default=None, metavar="URL", help="score a running skipjack server instead")
    h.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    h.add_argument(
        "--tokenized-requests",
        default="true",
        choices=["true", "false"],
        help="with --server: send prompts as token ids (lm-eval's default) or as text",
    )


def command(a) -> int:
    from skipjack import validate
    from skipjack.loading.load import DEFAULT_MODEL, resolve_dtype

    validate.text("--method", a.method, empty=False)
    if a.lm_eval is not None:
        from skipjack.evaluation import lmeval

        return lmeval.command(a)
    if a.server is not None or a.limit is not None:
        raise SkipjackError("--server and --limit go with --lm-eval")
    spec = a.model or DEFAULT_MODEL
    dtype, _ = resolve_dtype(spec, a.dtype)
    ref = None if a.reference_dtype is None else resolve_dtype(spec, a.reference_dtype)[0]
    out = validate.path("--out", a.out)
    out.mkdir(parents=True, exist_ok=True)  # before the load: a file in the way is a one-line error now
    row = evaluate(spec, a.method, dtype, Path(out), a.quick, a.task, ref, a.reference)
    p, g, t = row["perplexity"], row["greedy"], row["task"]
    label = "lossless" if row["lossless"] else "lossy"
    line = (
        f"{row['model']} {dtype} {a.method} ({label}): perplexity {p['ppl']:.3f} vs {p['ppl_ref']:.3f} "
        f"({p['ppl_increase']:+.2%}), top-1 agreement {p['top1_agreement']:.1%}, KL {p['kl']:.4f}; "
        f"greedy identical {g['identical']}/{g['prompts']}, {g['speedup']:.2f}x plain "
        f"(decoding {g['decode_speedup']:.2f}x)"
    )
    if t.get("name") not in (None, "none"):
        line += f"; {t['name']} {t['score']:.1%} (plain {t['score_plain']:.1%})"
    print(line)
    print(f"wrote {row['path']}")
    return 0
