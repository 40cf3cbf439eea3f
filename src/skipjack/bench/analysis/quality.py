"""What a lower precision costs in quality: perplexity and next-token agreement against fp32.

`python -m skipjack.bench.analysis.quality --dtype bf16 --out DIR` loads the model twice, in fp32 (the reference) and
in the other dtype, and runs every prompt of the suite (real text: Python documentation, licences, HumanEval,
hand-written questions, through the chat template) through both, teacher-forced. At every position it
compares the two next-token distributions p (fp32) and q:

- NLL of the token that actually follows, under each; perplexity = exp(mean NLL);
- whether the two argmaxes agree (a greedy decoder would pick the same token here);
- KL(p || q).

Sums per category and overall go to DIR/quality.json; `python -m skipjack.bench.benchmarks_md ... --quality DIR`
renders them (`skipjack.bench.render.render_quality`). (How often whole greedy outputs agree is the benchmark's
job: `skipjack bench --methods plain,plain@bf16` reports bf16's `identical` share against fp32 plain.)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

CHUNK = 512  # positions per LM-head call: bounds the [T, V] logits held at once


@torch.inference_mode()
def compare(ref, other, ids: list[int], chunk: int = CHUNK) -> dict:
    """Sums over the len(ids) - 1 predicted positions of one text: nll_ref, nll_other, agree, kl, tokens."""
    x = torch.tensor([ids])
    h_ref = ref(x, logits="none").last_hidden  # [1, T, D]
    h_other = other(x, logits="none").last_hidden  # [1, T, D]
    target = x[0, 1:]  # [T-1]
    out = {"tokens": len(ids) - 1, "nll_ref": 0.0, "nll_other": 0.0, "agree": 0, "kl": 0.0}
    for a in range(0, len(ids) - 1, chunk):
        b = min(a + chunk, len(ids) - 1)
        lp = torch.log_softmax(ref.head(h_ref[:, a:b])[0].float(), -1)  # [C, V]
        lq = torch.log_softmax(other.head(h_other[:, a:b])[0].float(), -1)  # [C, V]
        t = target[a:b, None]  # [C, 1]
        out["nll_ref"] -= lp.gather(1, t).sum().item()
        out["nll_other"] -= lq.gather(1, t).sum().item()
        out["agree"] += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        out["kl"] += (lp.exp() * (lp - lq)).sum().item()
    return out


def summarise(rows: list[dict]) -> dict:
    """Perplexities, their relative change, top-1 agreement and mean KL over a group of `compare` rows."""
    n = sum(r["tokens"] for r in rows)
    ppl_ref = math.exp(sum(r["nll_ref"] for r in rows) / n)
    ppl_other = math.exp(sum(r["nll_other"] for r in rows) / n)
    return {
        "texts": len(rows),
        "tokens": n,
        "ppl_ref": ppl_ref,
        "ppl_other": ppl_other,
        "ppl_change": ppl_other / ppl_ref - 1,
        "top1_agreement": sum(r["agree"] for r in rows) / n,
        "mean_kl": sum(r["kl"] for r in rows) / n,
    }


def main(argv: list[str] | None = None) -> int:
    from skipjack.bench.suite import load_suite
    from skipjack.errors import SkipjackError, run_command
    from skipjack.loading.load import DTYPES, load

    ap = argparse.ArgumentParser(prog="python -m skipjack.bench.analysis.quality", description=__doc__.splitlines()[0])
    ap.add_argument("--model", "-m", default=None)
    ap.add_argument("--dtype", default="bf16", help="the precision to compare with fp32")
    ap.add_argument("--suite", default="full")
    ap.add_argument("--out", required=True, help="folder for quality.json")
    a = ap.parse_args(argv)

    def body() -> None:
        if a.dtype not in DTYPES or a.dtype == "fp32":
            raise SkipjackError(f"--dtype must be one of {', '.join(d for d in DTYPES if d != 'fp32')}")
        prompts = load_suite(a.suite)
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        ref, other = load(a.model, "fp32"), load(a.model, a.dtype)
        rows, cats = [], {}
        for p in prompts:
            ids = ref.tokenizer.prompt_ids(p.messages)[: ref.model.config.max_position_embeddings]
            row = compare(ref.model, other.model, ids) | {"id": p.id, "category": p.category}
            rows.append(row)
            cats.setdefault(p.category, []).append(row)
            print(f"{p.id}: {row['agree'] / row['tokens']:.2%} top-1 agreement", file=sys.stderr)
        args = argv if argv is not None else sys.argv[1:]
        q = {
            "command": "python -m skipjack.bench.analysis.quality " + " ".join(args),
            "model": ref.name,
            "dtype": a.dtype,
            "suite": a.suite,
            "by_category": {c: summarise(r) for c, r in cats.items()},
            "overall": summarise(rows),
            "rows": rows,
        }
        (out / "quality.json").write_text(json.dumps(q, indent=1))
        from skipjack.bench.render import render_quality

        print(render_quality(q))

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
