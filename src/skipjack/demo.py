"""`make demo`: generate with plain decoding and with the fastest lossless method, and print the speedup."""

from __future__ import annotations

import sys

from skipjack.decoding.sampling import SamplingParams
from skipjack.engine import Engine, Request
from skipjack.loading.load import DEFAULT_MODEL
from skipjack.methods import AUTO

FASTEST_LOSSLESS = AUTO  # fastest lossless method overall in BENCHMARKS.md (regenerate: `make bench`)
DEFAULT_PROMPT = """Add type hints and a docstring to this function, and keep the code otherwise unchanged:

def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    averages = []
    for index in range(len(values) - window + 1):
        chunk = values[index:index + window]
        averages.append(sum(chunk) / window)
    return averages
"""


def main(argv: list[str]) -> int:
    prompt_text = argv[0] if argv and argv[0].strip() else DEFAULT_PROMPT
    engine = Engine.load(DEFAULT_MODEL)  # loads, then tunes the kernels for this machine (once; cached)
    loaded = engine.loaded
    print(f"model {loaded.name} loaded in {loaded.seconds:.1f}s ({'converted' if loaded.converted else 'cached'})")
    tok = engine.tokenizer
    ids = tok.prompt_ids(prompt_text)
    params = SamplingParams(max_new_tokens=160, stop_token_ids=tok.stop_ids)
    engine.complete(Request(ids[:16], SamplingParams(max_new_tokens=4)))  # warm-up
    show = lambda t: print(t, end="", flush=True)  # noqa: E731
    print(f"\n--- plain greedy ---\nprompt: {prompt_text.strip()[:200]}\n")
    plain = engine.complete(Request(ids, params), show)
    print(f"\n[plain: {plain.new_tokens} tokens, {plain.tokens_per_s:.1f} tok/s]")
    print(f"\n--- {FASTEST_LOSSLESS} (lossless speculation) ---\n")
    fast = engine.complete(Request(ids, params, FASTEST_LOSSLESS), show)
    same = "identical tokens" if fast.tokens == plain.tokens else "DIFFERENT TOKENS (bug!)"
    print(
        f"\n[{FASTEST_LOSSLESS}: {fast.new_tokens} tokens, {fast.tokens_per_s:.1f} tok/s, "
        f"{fast.tokens_per_pass:.2f} tokens per forward pass]"
    )
    print(f"\nspeedup {fast.tokens_per_s / plain.tokens_per_s:.2f}x over plain decoding, {same}")
    return 0 if fast.tokens == plain.tokens else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
