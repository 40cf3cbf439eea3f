"""The native decoding step: a model's layers, final norm and LM head in one C++ call per pass (`kernels/layer.h`).

llama2.c's `forward` on skipjack's block formats. The Python forward (`DecoderLM.forward`) stays the reference,
op by op; the native step runs the very same functions fused (one OpenMP parallel region per pass, threads
meeting at barriers between phases, scratch sized once per model), so both give the same bits
(`tests/test_native.py` checks it for every family, 1 to 65 rows, trees, skip sets, exit layers, taps and
ragged batches). Python keeps control: which layers run, skips, exits, taps, the caches' bookkeeping
(`LayerKV.reserve`); C++ does the arithmetic and writes the new keys straight into the cache buffers.

A pass runs natively where it can, chosen once per pass (`fits`): a batch-invariant fp32 model (every linear
in q4/q8 blocks), at most MAX_DRAFT + 1 rows, batch 1, every cache layer a plain `LayerKV` or `SlidingLayerKV`
holding fp32 (cache policies that evict, observe queries or store bf16/int8 keys run in Python), and no
per-layer trace. Wider passes (prompts) stay on the Python path (SDPA's causal attention over the prompt).
`SKIPJACK_NATIVE=0` turns the native step off; `reason(model)` says why a model runs in Python.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from skipjack.cache import LayerKV, SlidingLayerKV
from skipjack.limits import MAX_DRAFT
from skipjack.weights.kernels import kernels
from skipjack.weights.linear import ConcatLinear, QuantLinear

ENV = "SKIPJACK_NATIVE"
ROWS = MAX_DRAFT + 1  # the widest native pass: a verify step of MAX_DRAFT drafts + 1
PLAIN = (LayerKV, SlidingLayerKV)  # cache layers the native step writes into (exact types)
ATTN, FFN, TAP = 1, 2, 4  # per-layer flags


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


@contextmanager
def switched(on: bool):
    """The native step on or off for the duration (`SKIPJACK_NATIVE`), as it was afterwards."""
    old = os.environ.get(ENV)
    os.environ[ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = old


def reason(model) -> str | None:
    """Why `model` runs its passes in Python (None: it runs them natively)."""
    if not enabled():
        return f"{ENV}=0"
    if not model.invariant or model.dtype != torch.float32:
        return "its weights are not all in q4/q8 blocks"
    if not hasattr(type(model.layers[0]), "NORMS"):
        return f"no native layer for {type(model).__module__}"
    c = model.config
    if any(n % 32 for n in (c.hidden_size, c.num_attention_heads * c.head_dim, c.intermediate_size)):
        return "a layer width is not a multiple of 32"
    return None


def native(model):
    """The model's C++ twin (`kernels().Native`), built on first use; None where `reason` says it cannot be."""
    twin = model.__dict__.get("_native", False)
    if twin is False or model.__dict__.get("_native_env") != enabled():
        twin = _build(model) if reason(model) is None else None
        model.__dict__["_native"], model.__dict__["_native_env"] = twin, enabled()
    return twin


@dataclass
class Twin:
    run: object  # kernels().Native
    keys: list[str]  # the RoPE tables' order


def _parts(linear) -> tuple[list[tuple], torch.Tensor | None]:
    """A linear as the native step's weight parts (packed weight, bias), and a concatenation's bias."""
    if isinstance(linear, QuantLinear):
        return [(linear.args, linear.bias)], None
    if isinstance(linear, ConcatLinear):
        return [p for part in linear.parts for p in _parts(part)[0]], linear.bias
    raise TypeError(f"no native form for {type(linear).__name__}")


def _build(model):
    c, first = model.config, model.layers[0]
    keys = sorted({k for _, k in model.kinds})  # RoPE tables: one (cos, sin) pair per key
    twin = kernels().Native(
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.intermediate_size,
        c.rms_norm_eps,
        first.scale,
        len(first.NORMS) == 6,  # Gemma's layout: post-norms and q/k norms
        first.GELU,
        ROWS,
    )
    for block, (window, key) in zip(model.layers, model.kinds):
        qkv, qkv_bias = _parts(block.wqkv)
        norms = [getattr(block, n).detach() for n in block.NORMS]
        o, gu, down = (_parts(x)[0] for x in (block.wo, block.wgu, block.wd))
        twin.add_layer(qkv, qkv_bias, o, gu, down, norms, -1 if window is None else window, keys.index(key))
    twin.set_head(_parts(model.lm_head)[0], model.norm_weight.detach())
    return Twin(twin, keys)


def fits(model, rows: int, batch: int, caches) -> bool:
    """Whether a pass of `rows` rows over `caches` runs natively (decided once per pass)."""
    if rows > ROWS or batch != 1 or native(model) is None:
        return False
    return all(type(layer) in PLAIN and layer.k.dtype == torch.float32 for cache in caches for layer in cache)


@dataclass
class Pass:
    logits: torch.Tensor | None  # [R, V]: the rows asked for, softcapped as `DecoderLM.head` does
    hidden: dict[int, torch.Tensor]  # layer -> [M, D] after it
    last: torch.Tensor  # [M, D] before the final norm
    argmax: list[int] | None = None  # per logits row (None where a softcap could reorder ties)
    finite: bool | None = None  # whether every logit is finite


def forward(model, h, segments, order, skip_attn, skip_ffn, exit_layer, want, logits, owned: bool) -> Pass:
    """One pass (see `DecoderLM.forward`): h [1, M, D] (not modified unless `owned`), segments
    [(cache, positions [T], tree [T, T] or None)] covering the M rows in order; `logits` selects the rows
    ("all", "last", "none" or a slice). The LM head's rows come with their argmax and a finiteness check, made
    in the same C++ call (the decode loop needs nothing else of them on a greedy step)."""
    twin = native(model)
    M, D = h.shape[1], h.shape[2]
    x = h.reshape(M, D)
    x = x.contiguous() if owned else x.clone()
    positions = torch.cat([p for _, p, _ in segments]) if len(segments) > 1 else segments[0][1]
    ropes = model.ropes(positions)  # key -> (cos, sin) [M, D]
    tables = [t.contiguous() for k in twin.keys for t in ropes[k]]
    layers, flags = [], []
    for i in order:
        layers.append(i)
        f = (ATTN if i not in skip_attn else 0) | (FFN if i not in skip_ffn else 0)
        flags.append(f | (TAP if i in want else 0))
        if i == exit_layer:
            break
    kv, slots = [], []
    for i, f in zip(layers, flags):
        if f & ATTN:
            for cache, pos, _ in segments:
                a, first = cache[i].reserve(int(pos[0]), pos.shape[0])
                kv += (cache[i].k, cache[i].v)
                slots += (a, first)
    taps = [i for i, f in zip(layers, flags) if f & TAP]
    tapped = torch.empty(len(taps), M, D) if taps else None  # [n, M, D]
    rows = list(range(M))
    head = rows if logits == "all" else [] if logits == "none" else rows[-1:] if logits == "last" else rows[logits]
    seg = [p.shape[0] for _, p, _ in segments]
    trees = [None if t is None else t.contiguous() for _, _, t in segments]
    pos = positions.to(torch.long).contiguous()
    out, argmax, ok = twin.run.forward(x, pos, tables, seg, trees, layers, flags, kv, slots, tapped, head)
    hidden = {i: tapped[k] for k, i in enumerate(taps)}
    if out is None:
        return Pass(None, hidden, x)
    if getattr(model.config, "final_logit_softcapping", None):  # tanh may tie what the raw logits order
        return Pass(model.softcap(out), hidden, x, None, ok)
    return Pass(out, hidden, x, argmax, ok)
