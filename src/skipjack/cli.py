"""`skipjack` command line: generate, chat, models, bench. Thin: each subcommand calls library functions.

Any `SkipjackError` (bad input, missing model, ...) is printed as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from skipjack import store, validate
from skipjack.cli_args import grammar as _grammar
from skipjack.cli_args import params as _params
from skipjack.cli_args import sampling_args as _sampling_args
from skipjack.errors import SkipjackError, one_line
from skipjack.store import reason


def _notice(line: str | None) -> None:
    if line:
        print(line, file=sys.stderr)


def _method_notice(a, method) -> None:
    """Say so when a method or cache policy is lossy, or a lossless method will not give plain decoding's exact
    tokens at this dtype."""
    from skipjack import kvpolicies

    if a.kv is not None and not kvpolicies.is_lossless(a.kv):
        _notice(
            f"skipjack: note: --kv {a.kv} is lossy: it changes what the model attends to "
            f"(`skipjack eval --kv {a.kv}` measures what it costs in quality)"
        )
    if not method.lossless:
        how = "python -m skipjack.bench.superposed" if method.superposed_class else f"skipjack eval --method {a.method}"
        _notice(
            f"skipjack: note: {method.name} is lossy: its tokens differ from plain decoding's "
            f"(`{how}` measures what it costs in quality)"
        )
    elif not method.identical_to_plain(a.dtype):
        _notice(
            f"skipjack: note: in {a.dtype}, {method.name}'s output can differ from plain decoding's (the kernels round "
            "a pass over several tokens differently from a pass over one); --dtype q4 or fp32 keeps them identical"
        )


def _engine(a, spec: str | None = None):
    """Validate the request's settings and method first (they are cheap), then load and tune the model."""
    from skipjack.decoding.plan import resolve
    from skipjack.engine import Engine
    from skipjack.loading.load import BLOCKS, resolve_dtype
    from skipjack.store import check_home

    _params(a)
    _grammar(a)
    validate.strings("--stop", a.stop)
    if a.model is not None:
        validate.text("--model", a.model, empty=False)
    validate.text("--method", a.method, empty=False)
    method, _ = resolve(a.method, a.kv, session=a.cmd == "chat")  # parsed and checked: nothing built
    check_home()
    a.dtype, note = resolve_dtype(spec or a.model, a.dtype)  # "auto" -> what it loads as
    _notice(note)  # what it loads as, if not what was asked
    _method_notice(a, method)
    engine = Engine.load(spec or a.model, a.dtype, tune=not a.no_tune)
    if a.dtype in BLOCKS:
        _notice(f"skipjack: {a.dtype} weights: {engine.loaded.info['weights']}")
        if not engine.model.invariant:
            _notice("skipjack: note: some weights stay dense here, so the forward is not batch-invariant")
        if (native := engine.loaded.info["native"]) != "on":
            _notice(f"skipjack: note: decoding steps run in Python, not the native step ({native})")
    return engine, method


def cmd_generate(a) -> int:
    from skipjack.engine import Request
    from skipjack.prompt_file import check_path, load_prompt_cache, save_prompt_cache

    if a.prompt == "-":
        prompt_text = validate.utf8("the prompt on standard input", sys.stdin.buffer.read())
    else:
        prompt_text = validate.text("the prompt", a.prompt)
    if not prompt_text.strip():
        raise SkipjackError("the prompt is empty")
    cache_file = validate.path("--prompt-cache", a.prompt_cache) if a.prompt_cache else None
    if cache_file:
        check_path(cache_file)
    _check_num(a, cache_file is not None)
    engine, method = _engine(a)
    params = _params(a, engine.tokenizer)
    prompt = engine.tokenizer.prompt_ids(prompt_text, raw=a.raw)
    saved = load_prompt_cache(cache_file, engine.model, _notice) if cache_file else None

    def show(t):
        sys.stdout.write(t)
        sys.stdout.flush()

    request = Request(prompt, params, engine.method(a.method), tuple(a.stop), saved, kv=a.kv, grammar=_grammar(a))
    if a.num > 1:
        request.n = a.num
        results = engine.completions(request)
        _show_completions(a, engine, results)
        if cache_file:
            save_prompt_cache(cache_file, saved)
        return 0
    res = engine.complete(request, None if a.json else show)
    if a.json:
        out = res.to_json() | {"model": engine.name, "dtype": a.dtype, "load_seconds": round(engine.load_seconds, 3)}
        out["weights"] = engine.loaded.info.get("weights")
        out["native_step"] = engine.loaded.info.get("native") == "on"
        out["identical_to_plain"] = res.lossless and method.identical_to_plain(a.dtype)
        if res.layers:  # what a lossy layer strategy skipped
            out["skipped"] = res.layers
        if described := engine.method(a.method).drafter_description():  # a model-based drafter's skip set or exit
            out["drafter"] = described
        print(json.dumps(out, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        print(
            f"[{res.new_tokens} tokens, {res.tokens_per_s:.1f} tok/s, method {res.method}"
            + ("" if res.lossless else " (lossy)")
            + ("" if a.kv is None else f", kv {a.kv}")
            + f", {res.tokens_per_pass:.2f} tokens/step, finish: {res.finish}"
            + (f", {res.cached_tokens} of {res.prompt_tokens} prompt tokens from {cache_file}" if cache_file else "")
            + "]",
            file=sys.stderr,
        )
    if cache_file:  # after the result is out: a failed save never loses it
        save_prompt_cache(cache_file, saved)
    for problem in res.problems:
        print(f"skipjack: error: {problem}", file=sys.stderr)
    return 2 if res.problems else 0


def _check_num(a, session: bool) -> None:
    """`--num N` with the method and the sampling settings, before the model loads (superposed: N <= its k)."""
    from skipjack import methods
    from skipjack.limits import MAX_N

    validate.integer("--num", a.num, 1, MAX_N)
    spec = methods.MethodSpec.parse(validate.text("--method", a.method, empty=False))
    if spec.superposed_class is not None:
        methods.build(spec).check(_params(a), a.num, _grammar(a) is not None, False)
    elif a.num > 1 and session:
        raise SkipjackError("--num N > 1 runs N independent streams: they cannot share one --prompt-cache")


def _show_completions(a, engine, results) -> None:
    """`--num N`: each completion (numbered, with its log-probability where reported), then one summary line;
    or, with --json, one object with every completion's result."""
    wall, total, head = max(r.seconds for r in results), sum(r.new_tokens for r in results), results[0]
    if a.json:
        out = {"completions": [r.to_json() for r in results], "method": head.method, "lossless": head.lossless}
        out |= {"new_tokens": total, "seconds": wall, "tokens_per_s": total / wall if wall > 0 else 0.0}
        out |= {"model": engine.name, "dtype": a.dtype, "load_seconds": round(engine.load_seconds, 3)}
        print(json.dumps(out, ensure_ascii=False))
        return
    for i, r in enumerate(results):
        lp = "" if r.logprob is None else f", log-probability {r.logprob:.2f}"
        print(f"--- completion {i + 1} of {len(results)} ({r.new_tokens} tokens{lp}, finish: {r.finish}) ---")
        print(r.text)
    print(
        f"[{len(results)} completions, {total} tokens, {total / wall if wall > 0 else 0.0:.1f} tok/s, method "
        f"{head.method}" + ("" if head.lossless else " (lossy)") + ("" if a.kv is None else f", kv {a.kv}") + "]",
        file=sys.stderr,
    )


def cmd_chat(a) -> int:
    from skipjack.decoding.session import Session
    from skipjack.engine import Request

    if a.kv is not None:
        raise SkipjackError("chat carries its cache from turn to turn: --kv does not apply (use generate)")
    engine, _ = _engine(a)
    if not engine.tokenizer.chat_template:
        raise SkipjackError(f"model {engine.name!r} has no chat template; use `skipjack generate --raw`")
    params = _params(a, engine.tokenizer)
    messages: list[dict] = []
    history = Session()  # each turn runs only what the conversation's cache does not hold yet

    def show(t: str) -> None:
        print(t, end="", flush=True)

    print("skipjack chat: /reset clears the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except UnicodeDecodeError as e:  # an undecodable line is dropped; the chat goes on
            print(f"skipjack: error: that line is not valid UTF-8 ({e.reason}); it was dropped", file=sys.stderr)
            continue
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages.clear()
            history.clear()
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            prompt = engine.tokenizer.prompt_ids(messages)
            res = engine.complete(Request(prompt, params, a.method, tuple(a.stop), history, grammar=_grammar(a)), show)
        except (Exception, KeyboardInterrupt) as e:  # any failure drops this turn; the chat goes on
            messages.pop()
            if isinstance(e, BrokenPipeError):
                raise
            print(f"\n{_turn_error(e)}", file=sys.stderr)
            continue
        cached = f", {res.cached_tokens} of {res.prompt_tokens} prompt tokens cached"
        print(f"\n[{res.new_tokens} tokens, {res.tokens_per_s:.1f} tok/s{cached}]", file=sys.stderr)
        messages.append({"role": "assistant", "content": res.text})


def _turn_error(e: BaseException) -> str:
    """One line for a chat turn that failed."""
    if isinstance(e, KeyboardInterrupt):
        return "[interrupted]"
    if isinstance(e, SkipjackError):
        return f"skipjack: error: {e} (/reset starts over)"
    return f"skipjack: error: this turn failed ({_described(e)}); it was dropped (/reset starts over)"


def cmd_models(a) -> int:
    from skipjack.loading.load import DEFAULT_MODEL, NAMED, fetch_named, named_path

    if a.fetch:
        for name in a.fetch:
            if name not in NAMED:
                raise SkipjackError(f"unknown named model {name!r}; choose one of: {', '.join(NAMED)}")
            print(f"{name}: {fetch_named(name)}")
        return 0
    for name, spec in NAMED.items():
        have = named_path(name).exists()
        mark = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name:14s} {'fetched' if have else 'not fetched':12s} {spec.about}{mark}")
    return 0


def cmd_bench(a) -> int:
    from skipjack.bench.runner import main as bench_main

    return bench_main(a)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (exit 2), as every other error."""

    def error(self, message: str):
        print(f"skipjack: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


# The subcommands beyond generating, with their help; each one's module is imported only when it runs (`_tool`).
TOOLS = {
    "train-adapter": "distil a Kangaroo adapter for --method kangaroo (resumes if interrupted)",
    "serve": "an OpenAI-compatible HTTP server (chat, completions, streaming, /metrics)",
    "quantize": "layer-wise quantization: q8 for the important layers, q4 for the rest",
    "eval": "a method's quality against the exact model: perplexity, agreement, a task",
    "bench": "benchmark methods and peers on a prompt suite",
    "inspect": "what each layer says: the logit lens, and the FFN neurons that promote a token",
}


def _tool(name: str):
    """A tool's (add its arguments, run it), importing its module (and the web stack, plotting, training that
    module brings) now."""
    if name == "train-adapter":
        from skipjack.tools import distil

        return distil.add_arguments, distil.command
    if name == "serve":
        from skipjack.deploy import serving

        return serving.add_arguments, serving.main
    if name == "quantize":
        from skipjack.tools import lwq

        return lwq.add_arguments, lwq.command
    if name == "eval":
        from skipjack.evaluation import harness

        return harness.add_arguments, harness.command
    if name == "inspect":
        from skipjack.tools import lens

        return lens.add_arguments, lens.command
    from skipjack.bench import runner

    return runner.add_arguments, cmd_bench


def _tool_commands(sub, wanted: str | None) -> None:
    """Register the tool subcommands; only `wanted`'s (all of them when None) with its arguments."""
    for name, about in TOOLS.items():
        p = sub.add_parser(name, help=about)
        if wanted is None or wanted == name:
            add, run = _tool(name)
            add(p)
            p.set_defaults(func=run)


def _command(argv: list[str]) -> str | None:
    """The subcommand `argv` names: its first argument that is not an option (the top level takes no values)."""
    return next((x for x in argv if not x.startswith("-")), None)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; given the command line, only the tool subcommand it names is loaded (`TOOLS`)."""
    ap = _Parser(prog="skipjack", description="Faster LLM decoding by working with layers and KV cache.")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    g = sub.add_parser("generate", help="generate text from a prompt")
    _sampling_args(g)
    g.add_argument("--raw", action="store_true", help="send the prompt as plain text, not through the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument(
        "--num",
        type=int,
        default=1,
        metavar="N",
        help="N completions: superposed's N best drafts from one stream (--method superposed:k=K, N <= K), else "
        "N independent streams in one batch (a --seed s gives stream i the seed s + i)",
    )
    g.add_argument(
        "--prompt-cache",
        metavar="FILE",
        default=None,
        help="reuse the keys/values saved in FILE for the prompt's shared prefix, then save this run's there",
    )
    g.add_argument("prompt", help="the prompt ('-' reads standard input)")
    g.set_defaults(func=cmd_generate)
    c = sub.add_parser("chat", help="interactive chat with the model's chat template")
    _sampling_args(c)
    c.set_defaults(func=cmd_chat)
    m = sub.add_parser("models", help="list named models, or fetch them")
    m.add_argument("--fetch", nargs="+", metavar="NAME", help="download these named models")
    m.set_defaults(func=cmd_models)
    _tool_commands(sub, None if argv is None else _command(argv) or "")
    return ap


def _described(e: BaseException) -> str:
    if isinstance(e, OSError):
        where = f": {e.filename}" if e.filename else ""
        return f"{reason(e)}{where}"
    return one_line(f"{type(e).__name__}: {e}")


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every failure a user can cause or fix (bad input, a missing or damaged file, a full
    disk, an unwritable folder, a held lock, a closed pipe) is one line on stderr with exit status 2; a fault
    (`errors.Fault`: non-finite logits, a broken invariant) or a bug in skipjack is one `internal error` line
    with exit status 1 (`skipjack.errors`)."""
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser(argv).parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        import torch

        torch.set_num_threads(validate.threads() or torch.get_num_threads())
        store.home(), store.lock_wait()  # the other environment settings, checked before any work
        return args.func(args)
    except SkipjackError as e:
        print(f"skipjack: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nskipjack: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop writing, say so once
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print("skipjack: error: the output was closed before the end (broken pipe)", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"skipjack: error: {_described(e)}", file=sys.stderr)
        return 2
    except UnicodeError as e:
        print(f"skipjack: error: text that is not valid UTF-8 ({e})", file=sys.stderr)
        return 2
    except Exception as e:  # a fault or a bug: still one line, unless SKIPJACK_DEBUG asks for the traceback
        if os.environ.get("SKIPJACK_DEBUG"):
            raise
        from skipjack.errors import Fault

        what = one_line(str(e)) if isinstance(e, Fault) else _described(e)
        print(f"skipjack: internal error: {what} (set SKIPJACK_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
