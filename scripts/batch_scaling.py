"""Decode throughput of continuous batching alone (no HTTP, no prefill in the timing): B short prompts of the
default model joined into one batch, then stepped to 48 new tokens each; prints tokens/s, ms per step and,
for a speculative method, draft rows per step, for B = 1, 2, 4, 8, 16 and each method (methods alternate per
B). `python scripts/batch_scaling.py [--model M] [--methods plain,pld,auto]`."""

import argparse
import time

from skipjack.decoding.sampling import SamplingParams
from skipjack.engine import Engine, Request

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--methods", default="plain")
ap.add_argument("--tokens", type=int, default=48)
a = ap.parse_args()
e = Engine.load(a.model, "q4")
words = "cat dog ship tree river robot city bird moon lamp car book fish star rock door".split()
prompts = [e.tokenizer.prompt_ids(f"Write a short story about a {w}.") for w in words]
for B in (1, 2, 4, 8, 16):
    for method in a.methods.split(","):
        runner = e.runner()
        for p in prompts[:B]:
            runner.add(Request(p, SamplingParams(max_new_tokens=a.tokens), method))
        t, n, steps, drafted, accepted = time.perf_counter(), 0, 0, 0, 0
        while runner.busy():
            out = runner.step()
            n += sum(len(s.tokens) for _, _, s in out)
            drafted += sum(s.drafted for _, _, s in out)
            accepted += sum(s.accepted for _, _, s in out)
            steps += 1
        dt = time.perf_counter() - t
        print(
            f"B={B:2d} {method:6s}: decode {n / dt:6.1f} tok/s, {dt / steps * 1000:6.1f} ms/step, "
            f"{drafted / steps:5.2f} draft rows/step, {accepted / max(1, drafted):.0%} accepted",
            flush=True,
        )
