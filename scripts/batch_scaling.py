"""Decode throughput of continuous batching alone (no HTTP, no prefill in the timing): B short prompts of the
default model joined into one batch, then stepped to 48 new tokens each; prints tokens/s and ms per step for
B = 1, 2, 4, 8, 16. `python scripts/batch_scaling.py [--model M]`."""

import argparse
import time

from skipjack.engine import Engine, Request
from skipjack.sampling import SamplingParams

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2-135m")
a = ap.parse_args()
e = Engine.load(a.model, "q4")
words = "cat dog ship tree river robot city bird moon lamp car book fish star rock door".split()
prompts = [e.tokenizer.prompt_ids(f"Write a short story about a {w}.") for w in words]
for B in (1, 2, 4, 8, 16):
    runner = e.runner()
    for p in prompts[:B]:
        runner.add(Request(p, SamplingParams(max_new_tokens=48), "plain"))
    t, n, steps = time.perf_counter(), 0, 0
    while runner.busy():
        n += sum(len(s.tokens) for _, _, s in runner.step())
        steps += 1
    dt = time.perf_counter() - t
    print(f"B={B}: decode {n / dt:.1f} tok/s, {dt / steps * 1000:.1f} ms/step")
