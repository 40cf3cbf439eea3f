"""Superposed Decoding (Shen et al. 2024, "Superposed Decoding: Multiple Generations from a Single
Autoregressive Inference Pass", NeurIPS 2024): k completions of one prompt for about the cost of one.

The prompt runs once. Each later step feeds the model ONE input row, the superposition of the k drafts' last
tokens' embeddings,
    e = Σ_i w_i · E[x_i],   w_i = exp(S_i) / Σ_j exp(S_j)
(x_i: draft i's last token; S_i: its score, so the weights are the drafts' normalised probabilities), and
reads one next-token distribution p from it. The candidates are the k drafts × the top m tokens of that one
distribution (m = `top`, k by default: the k² candidates), each scored
    S_i + (1 - λ) · log p(t) + λ · log q_i(t)
with q_i the n-gram distribution after draft i's last tokens (the paper's interpolation, λ = `alpha`, as its
code names it); the k best become the new drafts. A candidate whose token is a stop token is set aside as a
finished draft (beam search's rule), so k drafts stay alive. The one KV cache holds the superposed keys: one
position per step, whatever k. As in the paper's code, p is sharpened by a temperature (`temp`; 0.06 there)
before it scores and weights. Decoding ends at the token budget, when no draft is alive, or when k finished
drafts all score above the best alive one (scores never rise: every term is a log-probability). The k
completions are the best-scored of the finished and alive drafts, best first; they are distinct by
construction (each step extends distinct drafts by distinct (draft, token) pairs).

The n-gram store: the paper interpolates n-gram models counted over a large corpus; ours is an `NGramTable`
(`drafters.ngram_table`, the table `ngram` drafts from) counted over the prompt, and with `table=NAME` also
the engine's shared table of that name (what `ngram:table=NAME`, or plain `ngram` for `default`, learned from
earlier requests), consulted where the prompt's table knows no context. A prompt's table is sparse, so where
the paper penalises drafts with no n-gram support, q_i is smoothed towards the model's own distribution (a
Dirichlet prior of weight `PRIOR`): q_i(t) = (c_i(t) + β·p(t)) / (N_i + β); with no counts q_i = p, and the
score is the model's alone.

Lossy: the drafts are not the model's own decoding (they share one superposed history). With k = 1 (and `top`
at its default) the input is the one draft's own embedding (weight exactly 1) and the one candidate is p's
argmax: plain greedy decoding, token for token. What the superposed pass cannot give, each completion's
log-probability under the model, comes from a teacher-forced pass over it after the prompt's cache (`score`,
on by default): the prompt's last logits for its first token, then one pass over the rest, as
`Engine.prompt_logprobs` scores a text.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from skipjack.decoding.session import Prefill, Session
from skipjack.drafters.ngram_table import NGramTable
from skipjack.errors import Fault, SkipjackError
from skipjack.limits import MAX_DRAFT, MAX_N

PRIOR = 1.0  # the model's distribution counts as this many observations in a draft's smoothed n-gram q


class Superposed:
    """The method's options (`superposed:k=3,...`), checked by the constructor (no work), and what a request
    must look like for it (`check`). `Superposition` runs one request."""

    name = "superposed"
    lossless = False

    def __init__(
        self,
        k: int = 3,
        top: int = 0,
        alpha: float = 0.5,
        temp: float = 0.1,
        order: int = 3,
        table: str = "",
        score: int = 1,
    ):
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_N:
            raise SkipjackError(
                f"superposed: k (drafts decoded together) must be an integer in [1, {MAX_N}] (got {k!r})"
            )
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 64:
            raise SkipjackError(
                f"superposed: top (tokens per draft, 0 = k) must be an integer in [0, 64] (got {top!r})"
            )
        if not isinstance(alpha, float) or not 0 <= alpha < 1:
            raise SkipjackError(f"superposed: alpha (the n-gram's weight) must be a number in [0, 1) (got {alpha!r})")
        if not isinstance(temp, float) or not (0 < temp <= 10):
            raise SkipjackError(f"superposed: temp must be a number in (0, 10] (got {temp!r})")
        if not isinstance(order, int) or isinstance(order, bool) or not 2 <= order <= 6:
            raise SkipjackError(f"superposed: order (n-gram length) must be an integer in [2, 6] (got {order!r})")
        if score not in (0, 1) or isinstance(score, bool):
            raise SkipjackError(f"superposed: score must be 0 or 1 (got {score!r})")
        self.k, self.top, self.alpha, self.temp, self.order = k, top or k, alpha, temp, order
        self.table, self.score = str(table), bool(score)

    @property
    def table_key(self) -> str | None:
        """The engine's shared table it reads (`Resources.tables`, named as `ngram` names them), or None."""
        return f"{self.table}/{self.order}" if self.table else None

    def check(self, params, n: int, grammar: bool, speculative: bool) -> None:
        """A request's fields that superposed decoding cannot honour: one-line errors, before any work."""
        if n > self.k:
            raise SkipjackError(
                f"superposed: n = {n} completions, but k = {self.k} drafts are decoded (ask superposed:k={n})"
            )
        if params.temperature > 0:
            raise SkipjackError(
                "superposed: its drafts are the k best-scored, not sampled: send temperature 0 (greedy)"
            )
        shaped = params.repetition_penalty != 1 or params.frequency_penalty or params.presence_penalty
        if shaped or params.logit_bias:
            raise SkipjackError("superposed: repetition, frequency and presence penalties and logit_bias do not apply")
        if grammar:
            raise SkipjackError("superposed: structured output (a grammar or a JSON schema) does not apply")
        if params.logprobs is not None and not self.score:
            raise SkipjackError("superposed: logprobs come from its scoring pass: they need score=1")
        if speculative:
            raise SkipjackError("superposed: it drafts nothing to verify: speculative n_max / p_min do not apply")


@dataclass
class Draft:
    tokens: list[int]  # the draft's generated tokens (a stop token excluded)
    score: float  # S: the sum of its steps' interpolated log-probabilities
    finish: str | None = None  # "stop" | "length" once finished
    logprob: float | None = None  # its log-probability under the model (the scoring pass), when scored
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)  # per token: (log-prob,
    # the `params.logprobs` most likely [(id, log-prob)]), when asked for


class Superposition:
    """One request's superposed decoding: the prompt's prefill (or a session's start) when made, then
    `advance` until it has `ended`, then `finish` (the ranked completions, scored) and `close`."""

    def __init__(self, model, method: Superposed, prompt: list[int], params, session: Session | None = None,
                 learned: NGramTable | None = None):  # fmt: skip
        self.model, self.method, self.params, self.prompt, self.session = model, method, params, list(prompt), session
        pre = (
            Prefill(model, prompt, params.max_new_tokens)
            if session is None
            else session.begin(model, prompt, params.max_new_tokens)
        )
        self.start = pre.run()
        self.cache, self.ran = self.start.cache, self.start.ran  # ran: prompt tokens run here (not a session's)
        self.ngrams = Ngrams(self.prompt, method.order, learned)
        self.alive, self.done = [Draft([], 0.0)], []
        self.steps, self.ended, self.closed, self.score_seconds = 0, False, False, 0.0
        self._extend(self.start.logits)

    def advance(self) -> bool:
        """One superposed step: one forward over the alive drafts' superposed last tokens, then the k best of
        their candidates. Returns whether decoding has ended."""
        ids = torch.tensor([[d.tokens[-1] for d in self.alive]])  # [1, k]
        w = torch.softmax(torch.tensor([d.score for d in self.alive], dtype=torch.float64), 0)  # [k]
        e = self.model.embed(ids)  # [1, k, D]
        h = (w.to(e.dtype)[None, :, None] * e).sum(1, keepdim=True)  # [1, 1, D]: Σ_i w_i · E[x_i]
        out = self.model(None, self.cache, hidden=h, logits="last")
        self.steps += 1
        self.cache.settle()
        self._extend(out.logits[0, -1], out.finite)  # [V]
        return self.ended

    def _extend(self, logits: torch.Tensor, finite: bool | None = None) -> None:
        """The k best (draft, token) candidates after the next-token logits [V] (`finite`: the native step's
        check of them); finished ones set aside."""
        if finite is None:  # as the decode loop checks: the sum, else every element
            finite = math.isfinite(float(logits.sum())) or bool(torch.isfinite(logits).all())
        if not finite:
            raise Fault("the model produced non-finite logits (NaN or inf): its weights may be damaged")
        m, params, made = self.method, self.params, len(self.alive[0].tokens)
        stops = frozenset() if params.ignore_eos else params.stop_token_ids
        if made < params.min_tokens and stops:  # stop tokens masked until min_tokens (as the sampler does)
            logits = logits.clone()
            logits[[t for t in stops if t < logits.shape[0]]] = -math.inf
        ids = torch.topk(logits, min(m.top, logits.shape[0])).indices  # [m]: by the logits, as greedy picks
        vals = torch.log_softmax(logits.float() / m.temp, -1)[ids].double()  # [m]: scores add up over many steps
        cands, done, tail, top = [], [], self.prompt[-m.order :], ids.tolist()
        for d in self.alive:
            lq = self.ngrams.logq(tail + d.tokens, top, vals) if m.alpha else None  # [m]
            s = d.score + ((1 - m.alpha) * vals + m.alpha * lq if m.alpha else vals)  # [m] (a masked token: -inf)
            for t, sc in zip(top, s.tolist()):
                if t in stops:  # finished: the stop token is not part of the completion
                    done.append(Draft(list(d.tokens), sc, "stop"))
                else:
                    cands.append((sc, d, t))
        self.done = _best(self.done + done, m.k)
        kept = sorted(cands, key=lambda c: -c[0])[: m.k]  # only the k kept candidates copy their tokens
        self.alive = [Draft(d.tokens + [t], sc) for sc, d, t in kept]
        full = made + 1 >= params.max_new_tokens or self.cache.capacity_left() <= 1
        beaten = len(self.done) >= m.k and (not self.alive or self.alive[0].score < self.done[-1].score)
        if full or beaten or not self.alive:
            for d in self.alive:
                d.finish = "length"
            self.ended = True

    def finish(self) -> list[Draft]:
        """The k completions, best first (finished and alive drafts by score), each scored under the model
        when `score` is on."""
        out = _best(self.done + (self.alive if self.ended else []), self.method.k)
        t = time.perf_counter()
        if self.method.score:
            for d in out:
                self._score(d)
            self.score_seconds = time.perf_counter() - t
        return out

    def _score(self, d: Draft) -> None:
        """d's tokens' log-probabilities under the model: the prompt's logits for the first, then one
        teacher-forced pass after the prompt's cache for the rest (a fresh pass where the cache cannot be cut
        back to the prompt: a sliding window that dropped its keys)."""
        n, toks, top = len(self.prompt), d.tokens, self.params.logprobs
        rows = [self.start.logits[None].float()]  # [1, V]
        if len(toks) > 1:
            if self.cache.resumable(n):  # in passes the native step takes whole
                self.cache.rewind(n)
                for i in range(0, len(toks) - 1, MAX_DRAFT + 1):
                    ids = torch.tensor([toks[i : min(i + MAX_DRAFT + 1, len(toks) - 1)]])  # [1, <= 65]
                    rows.append(self.model(ids, self.cache).logits[0].float())  # [<= 65, V]
                self.cache.rewind(n)
            else:
                ids = torch.tensor([self.prompt + toks[:-1]])  # [1, n + T - 1]
                rows.append(self.model(ids, logits=slice(n, None)).logits[0].float())  # [T - 1, V]
        lp = torch.log_softmax(torch.cat(rows)[: len(toks)], -1)  # [T, V]
        got = lp[torch.arange(len(toks)), torch.tensor(toks, dtype=torch.long)]  # [T]
        d.logprob = float(got.sum())
        if top is not None:
            tops = [lp[i].topk(top) for i in range(len(toks))] if top else None
            d.logprobs = [
                (float(got[i]), list(zip(tops[i].indices.tolist(), tops[i].values.tolist())) if tops else [])
                for i in range(len(toks))
            ]

    def close(self) -> None:
        """A session keeps the prompt's keys (the superposed ones are no tokens of it); else nothing to do."""
        if self.closed:
            return
        self.closed = True
        if self.session is not None:
            whole = self.cache.resumable(len(self.prompt))
            if whole:
                self.cache.rewind(len(self.prompt))
            self.session.end(self.model, self.cache, self.prompt, whole)


def _best(drafts: list[Draft], k: int) -> list[Draft]:
    """The k best-scored drafts with distinct tokens (two stop tokens after one draft finish it twice)."""
    seen, out = set(), []
    for d in sorted(drafts, key=lambda d: -d.score):
        if tuple(d.tokens) not in seen:
            seen.add(tuple(d.tokens))
            out.append(d)
    return out[:k]


class Ngrams:
    """The n-gram store a request's drafts are rescored with: its prompt's counts (weight 1 per occurrence),
    then, where the prompt knows no context, the engine's shared table (`learned`, if any)."""

    def __init__(self, prompt: list[int], order: int, learned: NGramTable | None = None):
        self.own, self.learned, self.order = NGramTable(order=order), learned, order
        self.own.add(prompt, 0, 1.0)

    def logq(self, context: list[int], ids: list[int], logp: torch.Tensor) -> torch.Tensor:
        """log q(t) for the tokens `ids` after `context`, smoothed towards the model's log-probabilities logp [m]:
        log((c(t) + β·p(t)) / (N + β)), in log space (a sharpened p underflows)."""
        tail = context[-(self.order - 1) :]
        counts = self.own.lookup(*tail) or (self.learned.lookup(*tail) if self.learned is not None else None)
        if not counts:
            return logp  # [m]: q = p
        c = torch.tensor([counts.get(t, 0.0) for t in ids], dtype=logp.dtype)  # [m]
        return torch.logaddexp(torch.log(c), math.log(PRIOR) + logp) - math.log(sum(counts.values()) + PRIOR)
