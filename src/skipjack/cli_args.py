"""The generate and chat commands' shared arguments: the model, the method, sampling and structured output."""

from __future__ import annotations

import argparse

from skipjack import validate
from skipjack.errors import SkipjackError


def sampling_args(p: argparse.ArgumentParser) -> None:
    from skipjack import kvpolicies, methods

    p.add_argument("--model", "-m", default=None, help="named model, .gguf file, HF folder or hub id")
    p.add_argument(
        "--dtype",
        default="auto",
        help="auto (default: q4 for a GGUF file, fp32 for a checkpoint) | q4 (the GGUF's 4-bit blocks on "
        "skipjack's batch-invariant kernels: speculation bit-identical to plain decoding) | q8 | fp32 (greedy "
        "output identical to HF) | bf16 (quality and speed in BENCHMARKS.md)",
    )
    p.add_argument(
        "--method",
        default="plain",
        help="decoding method: " + methods.method_help(),
    )
    p.add_argument(
        "--kv",
        default=None,
        help="KV cache policy: " + kvpolicies.policy_help(),
    )
    p.add_argument("--max-new-tokens", "-n", type=int, default=256)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]")
    p.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS", help="in [-100, 100], repeatable")
    p.add_argument("--min-tokens", type=int, default=0, help="stop tokens are ignored until this many tokens")
    p.add_argument("--ignore-eos", action="store_true", help="stop tokens do not end the output")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--json-schema", default=None, metavar="SCHEMA", help="the output obeys this JSON schema (@FILE)")
    p.add_argument("--grammar", default=None, metavar="GBNF", help="the output obeys this GBNF grammar (@FILE)")
    p.add_argument(
        "--no-tune", action="store_true", help="skip measuring this machine's fastest kernels (once per model, cached)"
    )


def params(a, tokenizer=None):
    """Sampling settings from the arguments; validated before any model is loaded."""
    from skipjack.decoding.sampling import SamplingParams

    return SamplingParams(
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        min_p=a.min_p,
        repetition_penalty=a.repetition_penalty,
        seed=a.seed,
        max_new_tokens=a.max_new_tokens,
        stop_token_ids=tokenizer.stop_ids if tokenizer else frozenset(),
        logit_bias=validate.id_values("--logit-bias", a.logit_bias) or None,
        frequency_penalty=a.frequency_penalty,
        presence_penalty=a.presence_penalty,
        ignore_eos=a.ignore_eos,
        min_tokens=a.min_tokens,
    )


def grammar(a):
    """Structured output from `--json-schema` or `--grammar` (text, or @FILE), checked before any model is
    loaded; None without either."""
    from skipjack.decoding.constraint import Grammar

    if a.json_schema is not None and a.grammar is not None:
        raise SkipjackError("--json-schema and --grammar: use one")
    text = a.json_schema if a.json_schema is not None else a.grammar
    if text is None:
        return None
    name = "--json-schema" if a.json_schema is not None else "--grammar"
    if text.startswith("@"):
        path = validate.path(name, text[1:])
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as x:
            raise SkipjackError(f"{name}: cannot read {path} ({type(x).__name__})") from None
    g = Grammar.schema(text) if a.json_schema is not None else Grammar("gbnf", text)
    g.text()  # checked now
    return g
