"""`skipjack train-adapter`: distil Kangaroo's adapter (`skipjack.drafters.kangaroo`) on the model's own outputs.

1. Text, local and offline (`skipjack.corpus`): the model's own greedy answers to `prompts` chat prompts built
   from the stdlib (what a draft has to predict is the model's own text), after raw stdlib source up to
   `tokens` tokens in all.
2. Teacher pass, once per document: the full model's hidden state after the shallow layers (the adapter's
   input) and its `TOP_K` likeliest next tokens with their probabilities (the distillation target). The
   positions are packed into `seq`-token chunks; the last `VAL_CHUNKS` chunks (the last answers) are held out.
3. Training: the adapter (the model frozen, its LM head a dense fp32 copy) minimises the cross-entropy of its
   next-token distribution against the teacher's top-k probabilities (Kangaroo's loss, truncated to the top
   k), with AdamW, a short warm-up and cosine decay. Batches are a function of (seed, step), so a run that
   is stopped and resumed makes the same updates as one that is not.
4. Checkpoints (adapter, optimiser, step) are written atomically every `save_every` steps beside the
   adapter's file, with the teacher data, so a killed run resumes where it stopped; both go when it ends
   (the answers stay: another training of the model, with other layers or steps, reuses them).
   The held-out top-1 agreement with the full model is measured before and after (before: the untrained
   adapter, which is an early exit after the shallow layers) and kept in the adapter file's metadata.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from skipjack import corpus, store
from skipjack.drafters.kangaroo import Adapter, default_path, identity, save
from skipjack.errors import SkipjackError
from skipjack.models import fingerprint
from skipjack.models.rowops import rms_norm
from skipjack.weights.linear import dense

TOP_K = 16  # teacher probabilities kept per position
VAL_CHUNKS = 8


@dataclass
class Settings:
    layers: int = 2  # shallow layers before the adapter
    tokens: int = 24_576  # training tokens (teacher-forced), answers included
    prompts: int = 48  # chat prompts the model answers
    answer: int = 128  # most tokens per answer
    vocab: int = 0  # train against the head rows of the `vocab` most frequent tokens only (0: all)
    seq: int = 256  # tokens per chunk
    batch: int = 8  # chunks per step
    steps: int = 120
    lr: float = 3e-3
    seed: int = 0
    save_every: int = 10


def _documents(loaded, s: Settings, bar, saved: Path, tune: bool) -> list[list[int]]:
    """Token lists to teacher-force: stdlib source in `seq`-token pieces, then the model's answers (last, so
    the held-out chunks are answers). Each answer is saved as it comes (`saved`, kept for later trainings of
    the same model: they reuse as many as they need), so a killed run keeps them too."""
    from skipjack.decoding import tuning
    from skipjack.engine import Engine

    key = {"model": fingerprint(loaded.model), "answer": s.answer, "seed": s.seed}
    talk = (_load(saved, key) or {}).get("talk", [])[: s.prompts]
    task = bar.add_task("the model's answers", total=s.prompts, completed=len(talk))

    def keep(ids: list[int]) -> None:
        talk.append(ids)
        _save_atomic({"talk": talk, "key": key}, saved)
        bar.advance(task)

    engine = Engine(loaded, tuning.tune(loaded.model) if tune else None)  # tuned: prompt lookup sized well
    corpus.answers(engine, corpus.prompts(s.prompts, s.seed)[len(talk) :], s.answer, keep)
    talk = [t for t in talk if t]
    rest = s.tokens + VAL_CHUNKS * s.seq - sum(map(len, talk))
    src = loaded.tokenizer.encode(corpus.source_text(8 * max(0, rest)), add_special_tokens=False)[: max(0, rest)]
    docs = [src[i : i + s.seq] for i in range(0, len(src) - s.seq + 1, s.seq)] + talk
    if sum(map(len, docs)) < (VAL_CHUNKS + s.batch) * s.seq:
        raise SkipjackError(f"train-adapter: only {sum(map(len, docs))} tokens of text for --tokens {s.tokens}")
    return docs


@torch.inference_mode()
def _teacher(model, docs: list[list[int]], s: Settings, tick) -> dict:
    """Per document: the hidden state after the shallow layers and the full model's top-k next tokens; all
    positions packed into [n, seq] chunks."""
    hid, prob, idx = [], [], []
    for d in docs:
        out = model(torch.tensor([d]), None, return_hidden=[s.layers - 1], logits="all")
        p, i = torch.softmax(out.logits[0].float(), -1).topk(TOP_K, -1)  # [T, K] x2
        hid.append(out.hidden[s.layers - 1][0].float())  # [T, D]
        prob.append(p.half())
        idx.append(i.int())
        tick()
    n = sum(len(d) for d in docs) // s.seq * s.seq
    pack = lambda xs: torch.cat(xs)[:n].reshape(n // s.seq, s.seq, -1).clone()  # noqa: E731  [n, seq, ...]
    return {"hidden": pack(hid), "prob": pack(prob), "idx": pack(idx)}


class Head:
    """The frozen LM head as a differentiable function of the draft's output: its final norm, the model's head
    weight (dense fp32) and the model's logit soft-capping; with `ids`, only those tokens' rows (FR-Spec's
    reduced vocabulary: a large vocabulary's head dominates a training step's time)."""

    def __init__(self, model, ids: torch.Tensor | None = None):
        V = model.lm_head.out_features
        self.ids = torch.arange(V) if ids is None else ids  # [V']
        self.w = dense(model.lm_head)[self.ids].contiguous()  # [V', D]
        self.pos = torch.full((V,), -1, dtype=torch.long)  # token -> its row here, -1 if absent
        self.pos[self.ids] = torch.arange(len(self.ids))
        self.eps, self.cap = model.config.rms_norm_eps, getattr(model.config, "final_logit_softcapping", None)

    def __call__(self, h: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        logits = F.linear(rms_norm(h, norm, self.eps), self.w)  # [..., V]
        return torch.tanh(logits / self.cap) * self.cap if self.cap else logits


def agreement(adapter: Adapter, head: Head, data: dict, rows: slice) -> float:
    """Share of held-out positions where the draft's top-1 token is the full model's."""
    with torch.no_grad():
        h = data["hidden"][rows]
        got = head.ids[head(adapter(h, torch.arange(h.shape[1])), adapter.norm2).argmax(-1)]  # [n, seq]
        return float((got == data["idx"][rows][..., 0]).float().mean())


def _frequent(data: dict, vocab: int, V: int) -> torch.Tensor | None:
    """The `vocab` tokens most often among the teacher's top-k over the corpus (None: all tokens)."""
    if not 0 < vocab < V:
        return None
    counts = torch.bincount(data["idx"].flatten().long(), minlength=V)  # [V]
    order = sorted(range(V), key=lambda t: (-int(counts[t]), t))
    return torch.tensor(sorted(order[:vocab]))


def _lr(s: Settings, step: int) -> float:
    warm = max(1, s.steps // 12)
    if step < warm:
        return s.lr * (step + 1) / warm
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, s.steps - warm))))


def _batch(s: Settings, step: int, n: int) -> torch.Tensor:
    """The chunk indices of a step: epoch-wise permutations seeded by (seed, epoch)."""
    per = max(1, n // s.batch)
    epoch, k = divmod(step, per)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(s.seed * 1_000_003 + epoch))
    return perm[k * s.batch : (k + 1) * s.batch]


def _save_atomic(obj, path: Path) -> None:
    with store.atomic_file(path) as tmp:
        torch.save(obj, tmp)


def train(
    loaded, s: Settings, out: Path | None = None, progress: bool = True, stop_after: int | None = None, tune=True
) -> dict:
    """Distil an adapter for `loaded` (module doc); returns what was measured. `stop_after`: end the run after
    that many steps as if killed (the checkpoint stays; tests resume from it). `tune`: measure the kernels
    first (`skipjack.decoding.tuning`, cached per machine) for the answers' decoding."""
    model, began = loaded.model, time.perf_counter()
    if s.tokens < s.seq * s.batch or s.steps < 1 or s.lr <= 0 or s.seq < 8:
        raise SkipjackError("train-adapter: need --tokens >= 8 chunks of --seq, --steps >= 1, --lr > 0")
    torch.manual_seed(s.seed)
    adapter = Adapter.for_model(model, s.layers)
    opt = torch.optim.AdamW(adapter.parameters(), lr=s.lr, weight_decay=0.0)
    out = out or default_path(model)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SkipjackError(f"train-adapter: cannot write beside {out}: {e.strerror}") from None
    ckpt, cached = out.with_suffix(".ckpt"), out.with_suffix(".teacher")
    talk = out.parent / f"answers-{fingerprint(model)[:20]}.pt"
    key = asdict(s) | {"model": identity(model)}
    corpus_key = {k: v for k, v in key.items() if k not in ("steps", "lr", "batch", "save_every", "vocab")}
    with _bar(progress) as bar:
        data = _load(cached, corpus_key)
        if data is None:
            docs = _documents(loaded, s, bar, talk, tune)
            task = bar.add_task("teacher pass", total=len(docs))
            data = _teacher(model, docs, s, lambda: bar.advance(task))
            data = {k: v.clone() for k, v in data.items()} | {"key": corpus_key}  # normal tensors, for autograd
            _save_atomic(data, cached)
        head = Head(model, _frequent(data, s.vocab, model.lm_head.out_features))
        before = agreement(adapter, head, data, slice(-VAL_CHUNKS, None))
        start, state = 0, _load(ckpt, key)
        if state is not None:
            adapter.load_state_dict(state["adapter"])
            opt.load_state_dict(state["opt"])
            start = state["step"]
        task = bar.add_task("training", total=s.steps, completed=start)
        t0, loss = time.perf_counter(), float("nan")
        end = s.steps if stop_after is None else min(s.steps, start + stop_after)
        for step in range(start, end):
            loss = _step(adapter, opt, head, data, s, step)
            bar.update(task, advance=1, description=f"training (loss {loss:.3f})")
            if (step + 1) % s.save_every == 0 and step + 1 < s.steps:
                state = {"adapter": adapter.state_dict(), "opt": opt.state_dict(), "step": step + 1, "key": key}
                _save_atomic(state, ckpt)
    if end < s.steps:
        return {"stopped_at": end}
    n = len(data["hidden"]) - VAL_CHUNKS
    about = {
        "model_name": loaded.name, "layers": s.layers, "vocab": s.vocab, "steps": s.steps, "tokens": n * s.seq,
        "loss": round(loss, 4),
        "agreement_before": round(before, 4), "agreement": round(agreement(adapter, head, data, slice(n, None)), 4),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "total_seconds": round(time.perf_counter() - began, 1),  # this call's (a resumed run: since it resumed)
    }  # fmt: skip
    save(adapter, model, out, about)
    for f in (ckpt, cached):
        f.unlink(missing_ok=True)
    return about | {"path": str(out)}


def _step(adapter: Adapter, opt, head: Head, data: dict, s: Settings, step: int) -> float:
    """One optimiser step on the step's batch (`_batch`) at the step's learning rate (`_lr`); its loss."""
    for g in opt.param_groups:
        g["lr"] = _lr(s, step)
    pick = _batch(s, step, len(data["hidden"]) - VAL_CHUNKS)
    h, p, i = data["hidden"][pick], data["prob"][pick].float(), head.pos[data["idx"][pick].long()]  # [B, seq, K]
    p = p * (i >= 0)  # teacher tokens outside a reduced head's vocabulary are not trained on
    logp = torch.log_softmax(head(adapter(h, torch.arange(s.seq)), adapter.norm2), -1)  # [B, seq, V']
    loss = -(p * logp.gather(-1, i.clamp(min=0))).sum(-1).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def _load(path: Path, key: dict):
    """A checkpoint or teacher file made with the same settings for the same model, else None."""
    try:
        obj = torch.load(path, weights_only=True)
    except Exception:  # absent, truncated or foreign: start over
        return None
    return obj if isinstance(obj, dict) and obj.get("key") == key else None


def _bar(progress: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*cols, disable=not progress, transient=False)


def add_arguments(p) -> None:
    """`skipjack train-adapter`'s arguments."""
    p.add_argument("--model", "-m", default=None, help="named model, .gguf file, HF folder or hub id")
    p.add_argument("--dtype", default="auto", help="the precision the teacher runs in (auto: q4 for a GGUF)")
    p.add_argument("--layers", type=int, default=2, help="shallow layers before the adapter (2-4)")
    p.add_argument("--tokens", type=int, default=24_576, help="training tokens of local text")
    p.add_argument("--steps", type=int, default=120, help="optimiser steps (8 x 256 tokens each)")
    p.add_argument("--prompts", type=int, default=48, help="chat prompts the model answers for the training text")
    p.add_argument(
        "--vocab",
        type=int,
        default=0,
        help="train against the N most frequent tokens' head rows (0: all; "
        "kangaroo then drafts over those N, as FR-Spec): for a large vocabulary",
    )
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="adapter file (default: beside the model cache, found by kangaroo)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def command(a) -> int:
    """`skipjack train-adapter`: distil and save an adapter (arguments validated before the model loads)."""
    from skipjack import validate
    from skipjack.loading import load as loading
    from skipjack.store import check_home

    s = Settings(
        layers=a.layers, tokens=a.tokens, steps=a.steps, lr=a.lr, seed=a.seed, prompts=a.prompts, vocab=a.vocab
    )
    validate.integer("--layers (Kangaroo uses 2-4)", s.layers, 1, 8)
    validate.integer("--vocab", s.vocab, 0)
    validate.integer("--prompts", s.prompts, 0, 10_000)
    validate.integer("--tokens", s.tokens, 1024, 1 << 24)
    validate.integer("--steps", s.steps, 1, 1_000_000)
    validate.number("--lr", s.lr, 0.0, 1.0, lo_open=True)
    validate.integer("--seed", s.seed, 0, 2**63 - 1)
    out = validate.writable_file("--out", validate.path("--out", a.out)) if a.out is not None else None
    check_home()
    loaded = loading.load(a.model, a.dtype)
    print(
        f"skipjack: distilling a kangaroo adapter after layer {s.layers - 1} of {loaded.name} ({a.dtype})",
        file=sys.stderr,
    )
    res = train(loaded, s, out, progress=not a.quiet)
    print(
        f"saved {res['path']}: top-1 agreement with the full model on held-out text {res['agreement']:.1%} "
        f"(untrained: {res['agreement_before']:.1%}); use it with --method kangaroo"
    )
    return 0
