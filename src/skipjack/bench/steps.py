"""Where a plain decoding step's time goes: the linear kernels, attention, and the rest.

`breakdown(model)` prefills `context` tokens, then times `steps` one-token forward passes (median). On the
native step (`skipjack.models.native`) the parts are what its C++ code times per phase. On the Python path it
times each part alone at that shape: every linear on one input row, and every layer's attention over the
cache it holds (the invariant kernel where the model uses it, SDPA otherwise). The rest of the step (Python
dispatch, norms, RoPE, elementwise ops, the sampler's argmax excluded) is the step minus both.
"""

from __future__ import annotations

import statistics
import time

import torch

from skipjack.models import DecoderLM, native
from skipjack.models.common import attend, kernel_attend


def _median_ms(fn, n: int) -> float:
    fn()  # warm
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _native_breakdown(model, one, context: int, steps: int) -> dict:
    """The native step's parts as its C++ code times them (thread 0's wall time between barriers), over `steps`
    steps whose mean time is the total; the rest is that total minus the linears (LM head included) and
    attention: norms, quantisation of activations, RoPE, cache writes, barriers and Python."""
    twin = native.native(model).run
    twin.profile(True)
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    total = (time.perf_counter() - t0) * 1000 / steps  # the mean, as the phases are
    phases = {k: v * 1000 / steps for k, v in twin.profile(False)}
    linears = phases["matmuls"] + phases["LM head"]
    attention = phases["attention"]
    out = _parts("native", context, steps, total, linears, attention)
    return out | {"phases_ms": {k: round(v, 3) for k, v in phases.items()}}


def _parts(path: str, context: int, steps: int, total: float, linears: float, attention: float) -> dict:
    """A breakdown's record: the rest is the step minus its linears and attention."""
    return {
        "path": path,
        "context": context,
        "steps": steps,
        "total_ms": round(total, 2),
        "linears_ms": round(linears, 2),
        "attention_ms": round(attention, 2),
        "other_ms": round(max(total - linears - attention, 0.0), 2),
    }


@torch.inference_mode()
def breakdown(model: DecoderLM, context: int = 256, steps: int = 16) -> dict:
    c = model.config
    cache = model.make_cache(context + 3 * steps + 8)
    model(torch.arange(context)[None] % c.vocab_size, cache)
    step = iter(range(10**6))
    one = lambda: model(torch.tensor([[next(step) % c.vocab_size]]), cache, logits="last")  # noqa: E731
    if native.fits(model, 1, 1, [cache]):
        for _ in range(3):  # warm (a model's first passes fault its weights in)
            one()
        return _native_breakdown(model, one, context, steps)
    total = _median_ms(one, steps)
    linears = 0.0
    for lin in model.linears():
        x = torch.randn(1, 1, lin.in_features, dtype=model.dtype)
        linears += _median_ms(lambda lin=lin, x=x: lin(x), steps)
    q = torch.randn(1, c.num_attention_heads, 1, c.head_dim, dtype=model.dtype)  # [B, H, 1, D]
    attention, scale = 0.0, c.head_dim**-0.5
    for layer in cache:
        k, v, _ = layer.stored()  # [B, H_kv, n, D] x2
        if model.invariant:
            attention += _median_ms(lambda k=k, v=v: kernel_attend(q, k, v, None, scale), steps)
        else:
            attention += _median_ms(lambda k=k, v=v: attend(q, k, v, None, scale, False), steps)
    return _parts("python", context, steps, total, linears, attention)
