"""`skipjack eval --lm-eval TASKS`: EleutherAI's lm-evaluation-harness on the engine or on a running server.

Two ways to reach the model, scored by the harness's own code (its task files, prompts, metrics):
- **in process** (`SkipjackLM`): the engine, as `skipjack generate` runs it. The harness's requests:
  - log-likelihood (multiple choice): the context and continuation are tokenized as the harness's API models do
    (`TemplateLM._encode_pair`, no special tokens). The exact model scores them with `Engine.prompt_logprobs`:
    the same pass as the server's `echo`, summed in the same order. So in-process and served scores agree to
    the bit. A lossy layer strategy scores the continuation as it would decode it: the context as a prompt,
    the continuation through `strategy.forward` (`common.continuation_logprobs`);
  - rolling log-likelihood (perplexity tasks): disjoint windows of the context length, scored the same way;
  - generation (`generate_until`): `Engine.complete` with the method, stop strings and the model's stop ids.
- **served** (`--server URL`): the harness's `local-completions` client on `/v1/completions`, tokenizing with
  the server's `/tokenize` and `/tokenizer_info` (`tokenizer_backend=remote`), prompts sent as token ids or as
  text (`tokenized_requests`). The server scores `echo` with the exact model whatever its method, so there
  only generation tasks measure the method.

Task files: the bundled ones (`tasks/`: `skipjack_capitals`, multiple choice; `skipjack_arith`, generation;
documents made locally), a YAML file or a folder of them, or a name in lm-eval's own registry (those download
their data from the hub: not offline).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import yaml

from skipjack import methods
from skipjack.decoding.sampling import SamplingParams
from skipjack.engine import Engine, Request
from skipjack.errors import SkipjackError, Unavailable
from skipjack.evaluation.common import continuation_logprobs, label, slug
from skipjack.methods import MethodSpec

TASKS = Path(__file__).parent / "tasks"
VERSION = "0.4.13"  # the lm-eval these adapters were written against (pinned in pyproject's `eval` extra)

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # `skipjack eval --lm-eval` says how to install it; nothing else needs it
    TemplateLM = object


def require() -> None:
    if TemplateLM is object:
        raise Unavailable(f"--lm-eval needs lm-eval: pip install 'lm-eval=={VERSION}' (or skipjack[eval])")


class SkipjackLM(TemplateLM):
    """The engine as an lm-eval model (see the module's docstring)."""

    def __init__(self, engine: Engine, spec: str = "plain", max_gen_toks: int = 256):
        super().__init__()
        self.engine, self.spec, self.max_gen_toks = engine, spec, max_gen_toks
        ms = MethodSpec.parse(spec)
        self.strategy = methods.strategy(ms, engine.tokenizer)
        self.max_length = engine.model.config.max_position_embeddings
        tok = engine.tokenizer
        names = getattr(tok.hf, "special_tokens_map", {}) or {}
        ids = {k: self._token_id(names.get(k)) for k in ("bos_token", "eos_token")}
        self._eot = ids["eos_token"] if ids["eos_token"] is not None else min(tok.stop_ids)
        self._prefix = ids["bos_token"] or self._eot  # as the harness's remote tokenizer: BOS, else EOS

    def _token_id(self, text: str | None) -> int | None:
        ids = self.engine.tokenizer.encode(text, add_special_tokens=False) if text else []
        return ids[0] if ids else None

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.engine.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.engine.tokenizer.decode(tokens)

    def _score(self, context: list[int], cont: list[int]) -> tuple[float, bool]:
        """(sum of the continuation's logprobs, whether each was the most likely token), the context cut on the
        left to fit the context length, as the harness's API models do."""
        ids = (context + cont)[-self.max_length :]
        start = len(ids) - len(cont)
        if self.strategy is None:
            got = self.engine.prompt_logprobs(ids, 1)[start:]
            return sum(g.logprob for g in got), all(g.logprob == g.top[0][1] for g in got)
        lp = continuation_logprobs(self.engine.model, self.strategy, ids[:start], cont)  # [C, V]
        picked = lp.gather(1, torch.tensor(cont)[:, None])[:, 0]  # [C]
        return float(picked.sum()), bool((picked == lp.max(-1).values).all())

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        return [self._score(list(ctx), list(cont)) for _, ctx, cont in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for (text,) in (r.args for r in requests):
            windows = get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1)
            out.append(sum(self._score(*make_disjoint_window(w))[0] for w in windows))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        tok = self.engine.tokenizer
        out = []
        for context, kw in (r.args for r in requests):
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(kw.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample", True) else 0.0
            ids = self.tok_encode(context)[-max(1, self.max_length - n) :]
            params = SamplingParams(temperature=temperature, max_new_tokens=n, stop_token_ids=tok.stop_ids, seed=1234)
            out.append(self.engine.complete(Request(ids, params, self.spec, tuple(s for s in until if s))).text)
        return out


def served(url: str, tokenized: bool = True):
    """The harness's own OpenAI-completions client on a running skipjack server (its tokenizer through the
    server's /tokenize, /detokenize and /tokenizer_info)."""
    import httpx
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    base = url.rstrip("/")
    key = os.environ.get("OPENAI_API_KEY")
    try:
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        card = httpx.get(f"{base}/v1/models", headers=auth, timeout=10).json()["data"][0]
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        raise Unavailable(f"--server {url}: no skipjack server answers there (GET /v1/models)") from None
    return LocalCompletionsAPI(
        base_url=f"{base}/v1/completions",
        model=card["id"],
        tokenizer_backend="remote",
        tokenized_requests=tokenized,
        max_length=card.get("max_model_len", 2048),
        num_concurrent=1,
        max_retries=1,
        auth_token=os.environ.get("OPENAI_API_KEY") or None,  # the completions client reads the same variable
    )


def task_names(specs: list[str]) -> tuple[list[str], list[str]]:
    """(task names, folders to index): a YAML file gives its `task` (its folder indexed), a folder every task in
    it, any other word a task name (the bundled folder is always indexed)."""
    names, include = [], [str(TASKS)]
    for s in specs:
        p = Path(s).expanduser()
        if p.is_file():
            try:
                doc = yaml.load(p.read_text(), Loader=_Loader)
            except (OSError, yaml.YAMLError) as x:
                raise SkipjackError(f"--lm-eval {s}: not a readable task file ({type(x).__name__})") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("task"), str):
                raise SkipjackError(f"--lm-eval {s}: a task file needs a `task:` name")
            names.append(doc["task"])
            include.append(str(p.parent))
        elif p.is_dir():
            found = [d["task"] for d in _yamls(p) if isinstance(d.get("task"), str)]
            if not found:
                raise SkipjackError(f"--lm-eval {s}: no task file in this folder")
            names += found
            include.append(str(p))
        elif s.endswith((".yaml", ".yml")) or "/" in s:
            raise SkipjackError(f"--lm-eval {s}: no such file or folder")
        else:
            names.append(s)
    return names, list(dict.fromkeys(include))


class _Loader(yaml.SafeLoader):
    """YAML with lm-eval's `!function` tags read as plain strings (only the `task:` name is wanted here)."""


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def _yamls(folder: Path) -> list[dict]:
    out = []
    for f in sorted(folder.glob("*.y*ml")):
        try:
            d = yaml.load(f.read_text(), Loader=_Loader)
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(d, dict):
            out.append(d)
    return out


def evaluate(lm, names: list[str], include: list[str], limit: int | None) -> dict:
    """Runs the harness: {"results": {task: {metric: value}}, "samples": {task: [per-document record]}}."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notes on custom datasets, per task
    manager = TaskManager(include_path=include, include_defaults=False)  # lm-eval's own index takes seconds
    if not set(names) <= set(manager.all_tasks):
        manager = TaskManager(include_path=include, include_defaults=True)
    missing = [n for n in names if n not in set(manager.all_tasks)]
    if missing:
        raise SkipjackError(f"--lm-eval: no task named {missing[0]!r} (a task file, a folder, or one of lm-eval's)")
    res = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, bootstrap_iters=0, log_samples=True)
    results = {
        t: {k.split(",")[0]: v for k, v in m.items() if isinstance(v, int | float) and not k.endswith("_stderr")}
        for t, m in res["results"].items()
    }
    return {"results": results, "samples": res.get("samples", {})}


def command(a) -> int:
    """`skipjack eval --lm-eval TASKS`: the tasks on the method (and on plain, in process, for comparison) or on a
    server; one line per task and metric, and DIR/lmeval__<model>__<method>.json."""
    import json

    from skipjack import store, validate

    require()
    names, include = task_names([t for t in a.lm_eval.split(",") if t.strip()])
    if not names:
        raise SkipjackError("--lm-eval: name at least one task")
    limit = None if a.limit is None else validate.integer("--limit", a.limit, 1)
    out = Path(validate.path("--out", a.out))
    out.mkdir(parents=True, exist_ok=True)
    MethodSpec.parse(a.method)  # a bad spec fails before the load
    row: dict = {"format": 1, "tasks": names, "limit": limit, "lm_eval": VERSION}
    if a.server:
        if a.method != "plain" or a.model:
            raise SkipjackError("--server measures the server's own model and method (start it with them)")
        row |= {"server": a.server, "tokenized_requests": a.tokenized_requests == "true"}
        lm = served(a.server, row["tokenized_requests"])
        row |= {"model": lm.model, "method": _server_method(a.server)}
        runs = {"scores": lm}
    else:
        from skipjack.loading.load import DEFAULT_MODEL, resolve_dtype

        spec = a.model or DEFAULT_MODEL
        dtype, _ = resolve_dtype(spec, a.dtype)
        engine = Engine.load(spec, dtype)
        row |= {"model": label(engine.name), "dtype": dtype, "method": a.method}
        row["lossless"] = MethodSpec.parse(a.method).lossless
        runs = {"scores": SkipjackLM(engine, a.method)}
        if a.method != "plain":
            runs["scores_plain"] = SkipjackLM(engine, "plain")
    for role, lm in runs.items():
        row[role] = evaluate(lm, names, include, limit)["results"]
    path = out / f"lmeval__{slug(row['model'])}__{slug(row['method'] or 'server')}.json"
    with store.atomic_file(path) as tmp:
        tmp.write_text(json.dumps(row, indent=1, default=float))
    for task, metrics in row["scores"].items():
        for k, v in metrics.items():
            if k != "sample_len":
                ref = row.get("scores_plain", {}).get(task, {}).get(k)
                print(f"{task} {k}: {v:.4f}" + ("" if ref is None else f" (plain {ref:.4f})"))
    print(f"wrote {path}")
    return 0


def _server_method(url: str) -> str | None:
    import httpx

    try:
        return httpx.get(f"{url.rstrip('/')}/health", timeout=10).json().get("method")
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
